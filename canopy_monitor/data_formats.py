"""TRL's data set types: which columns each trainer reads, and the prompt of a row.

TRL's documentation (https://huggingface.co/docs/trl/dataset_formats) names each type
of data set by the columns of its rows:

- language modeling: `messages` (a conversation) or `text`;
- prompt-completion: `prompt` and `completion`;
- preference: `chosen` and `rejected`, with `prompt` (explicit prompt) or without it,
  when the prompt is the turns that `chosen` and `rejected` share (implicit prompt);
- prompt-only: `prompt`. GRPO and RLOO pass any further columns, such as `answer`, to
  the reward functions.

Each column contains text (the standard format) or a list of role/content messages (the
conversational format).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from canopy_monitor.recipe import RecipeError
from canopy_monitor.rewards import get_reward_functions, required_columns

# Data set type that each trainer reads, as a phrase for error messages.
TRAINER_DATA = {
    "sft": "a language modeling data set (a `messages` or `text` column) or a prompt-completion data set "
    "(`prompt` and `completion` columns)",
    "dpo": "a preference data set (`chosen` and `rejected` columns, and optionally `prompt`)",
    "grpo": "a prompt-only data set (a `prompt` column)",
    "rloo": "a prompt-only data set (a `prompt` column)",
}


def check_trainer_columns(trainer: str, columns: Collection[str], source: str, rewards: Sequence[str] = ()) -> None:
    """Raise `RecipeError` unless a data set with `columns` can train with `trainer` and `rewards`.

    Args:
        trainer (`str`): `"sft"`, `"dpo"`, `"grpo"` or `"rloo"`.
        columns (`Collection[str]`): the data set's column names.
        source (`str`): the recipe field that names the data set, for the message, such
            as `"dataset.name 'python-docstrings'"`.
        rewards (`Sequence[str]`, *optional*): names of the reward functions, whose
            parameters name further columns that must exist.
    """
    columns = set(columns)
    if trainer == "sft":
        fits = "messages" in columns or "text" in columns or {"prompt", "completion"} <= columns
    elif trainer == "dpo":
        fits = {"chosen", "rejected"} <= columns
    else:
        fits = "prompt" in columns
    if not fits:
        raise RecipeError(
            f"trainer {trainer!r} needs {TRAINER_DATA[trainer]}, but {source} has the columns "
            f"{_column_list(columns)}. Choose a data set in that format or another trainer."
        )

    for function in get_reward_functions(rewards):
        missing = [column for column in required_columns(function) if column not in columns]
        if missing:
            raise RecipeError(
                f"The reward function {function.__name__!r} reads the column(s) {_column_list(missing)}, "
                f"but {source} has the columns {_column_list(columns)}."
            )


def row_prompt(row: dict[str, Any]) -> str | list[dict[str, str]]:
    """Return the prompt of a data set row, as text or as a list of messages.

    The prompt is the `prompt` column when there is one. A conversation (`messages`) is
    cut before its last assistant turn. For a preference row without a prompt, it is
    the turns that `chosen` and `rejected` share, as TRL's `extract_prompt` finds them.

    Raises:
        ValueError: the row has no prompt, for example a `text` row or a conversation
            without an assistant turn after a user turn.
    """
    if "prompt" in row:
        return row["prompt"]

    if "messages" in row:
        messages = row["messages"]
        roles = [message.get("role") for message in messages]
        if "assistant" in roles[1:]:
            last_answer = len(roles) - 1 - roles[::-1].index("assistant")
            return messages[:last_answer]
        raise ValueError("the conversation has no assistant turn after its first message, so it has no prompt")

    if "chosen" in row and "rejected" in row:
        from trl.data_utils import extract_prompt

        prompt = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})["prompt"]
        if not prompt:
            raise ValueError("`chosen` and `rejected` share no leading turns or text, so the row has no prompt")
        return prompt

    raise ValueError(f"a row with the columns {_column_list(row)} has no prompt")


def _column_list(columns: Collection[str]) -> str:
    return ", ".join(f"`{column}`" for column in sorted(columns)) or "(none)"
