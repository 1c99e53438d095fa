"""Verifiable reward functions for TRL's GRPO and RLOO trainers.

Each function has TRL's reward signature, `reward(completions, **kwargs) -> list[float]`:
`completions` contains one completion per rollout, either as text or, for conversational
prompts, as a list of messages (`[{"role": "assistant", "content": "..."}]`). The other
columns of the training set arrive as keyword arguments, one list entry per rollout, so
a reward that needs the `answer` column declares an `answer` parameter.

A recipe names its rewards (`rewards: [exact_answer]`), looked up in `REWARD_FUNCTIONS`.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

RewardFunction = Callable[..., list[float]]

# A number as written in an answer: digits with optional thousands separators in groups
# of three, an optional decimal part, and a minus sign only where no word character or
# point precedes it, so that "14-8" reads as 14 and 8 rather than 14 and -8.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")

# Parameters that TRL passes to every reward function and that are not data set columns.
_TRL_ARGUMENTS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


def parse_number(text: str) -> Fraction | None:
    """Parse one number written as in an answer ("42", "-3", "1,250", "2.50") into an exact fraction.

    Returns `None` when `text`, stripped of spaces, is not a single number.
    """
    stripped = text.strip()
    match = _NUMBER.fullmatch(stripped)
    if match is None:
        return None
    return Fraction(match.group().replace(",", ""))


def final_number(text: str) -> Fraction | None:
    """Return the last number written in `text` as an exact fraction, or `None` when it contains none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return Fraction(matches[-1].replace(",", ""))


def completion_text(completion: Any) -> str | None:
    """Return the text of one completion: the string itself, or the content of its last message.

    Returns `None` for a conversational completion that is empty or whose last message
    has no string `content`, so that the caller can score it as wrong.

    Raises:
        TypeError: `completion` is neither a string nor a list of messages.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        if not completion or not isinstance(completion[-1], dict):
            return None
        content = completion[-1].get("content")
        return content if isinstance(content, str) else None
    raise TypeError(
        f"A completion must be a string or a list of messages, got {type(completion).__name__}: {completion!r:.80}"
    )


def exact_answer(completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """Score each completion 1.0 when its last number equals the reference answer exactly, else 0.0.

    The comparison is between exact fractions, so "2.50" matches "2.5" and "1,250"
    matches 1250, but "2.4999" does not match 2.5. A completion without a number, or a
    conversational completion without text, scores 0.0.

    Args:
        completions (`Sequence[str]` or `Sequence[list[dict]]`): one completion per rollout.
        answer (`Sequence[str | int | float]`): the reference answer of each rollout's prompt,
            the data set's `answer` column.
        **kwargs: the other columns and TRL's extra arguments, ignored.

    Raises:
        ValueError: the lengths differ, or a reference answer is not a number.
        TypeError: a completion is neither a string nor a list of messages.
    """
    if len(completions) != len(answer):
        raise ValueError(f"exact_answer got {len(completions)} completions but {len(answer)} answers.")

    rewards = []
    for completion, reference in zip(completions, answer):
        expected = answer_value(reference)
        text = completion_text(completion)
        found = final_number(text) if text is not None else None
        rewards.append(1.0 if found is not None and found == expected else 0.0)
    return rewards


def answer_value(reference: Any) -> Fraction:
    """Convert a reference answer (a number, or text such as "1,250") to an exact fraction.

    Raises:
        ValueError: the answer is not a single number.
    """
    if isinstance(reference, bool):
        raise ValueError(f"Invalid reference answer {reference!r}: expected a number.")
    if isinstance(reference, int):
        return Fraction(reference)
    if isinstance(reference, float) and math.isfinite(reference):
        # Through the shortest decimal form, so that 0.1 is 1/10 and not the binary fraction.
        return Fraction(repr(reference))
    if isinstance(reference, str):
        value = parse_number(reference)
        if value is not None:
            return value
    raise ValueError(f"Invalid reference answer {reference!r}: expected a number such as 42, -3 or 2.5.")


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "exact_answer": exact_answer,
}

# Checks of the data set columns that reward functions read, run on the training set
# before training starts. Each raises ValueError for a value the reward cannot use.
COLUMN_CHECKS: dict[str, Callable[[Any], Any]] = {
    "answer": answer_value,
}


def get_reward_functions(names: Sequence[str]) -> list[RewardFunction]:
    """Return the reward functions that `names` refer to, in order.

    Raises:
        ValueError: a name is not in `REWARD_FUNCTIONS`.
    """
    functions = []
    for name in names:
        if name not in REWARD_FUNCTIONS:
            known = ", ".join(sorted(REWARD_FUNCTIONS))
            raise ValueError(f"Unknown reward function {name!r}. Available: {known}.")
        functions.append(REWARD_FUNCTIONS[name])
    return functions


def required_columns(function: RewardFunction) -> list[str]:
    """Return the data set columns a reward function needs: its parameters without a default.

    TRL's own arguments (`completions`, `prompts`, `trainer_state`, ...) are not columns.
    """
    columns = []
    for parameter in inspect.signature(function).parameters.values():
        is_named = parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        if is_named and parameter.default is inspect.Parameter.empty and parameter.name not in _TRL_ARGUMENTS:
            columns.append(parameter.name)
    return columns
