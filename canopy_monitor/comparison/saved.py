"""Saved results of `canopy-monitor evaluate`, read back as one side of a comparison.

A result stores each prompt's text and figures, each rollout's text, length and entropy
rate, and the settings it was sampled with, in its display units. Reading it converts
the figures back to nats. The step entropies are not stored, so the running entropy
rates are those of the positions the result was measured at, and no others.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import SamplingConfig
from ..estimators import PromptEstimates, SemanticPromptEstimates, estimate_semantic_prompt
from ..prompts import Prompt
from ..semantic import SentenceEmbedder
from ..sinks.units import UNITS, convert_nested

# `SamplingConfig` fields that must be equal on both sides of a comparison. The batch
# size is left out: the sampler's own loop draws the same rollouts for any batch size.
SAMPLING_FIELDS = ("num_rollouts", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "use_chat_template")
# The JSON type of each saved sampling setting, and its name in errors.
_SETTING_TYPES = {
    "num_rollouts": (int, "an integer"),
    "max_new_tokens": (int, "an integer"),
    "temperature": ((int, float), "a number"),
    "top_k": (int, "an integer"),
    "top_p": ((int, float), "a number"),
    "seed": (int, "an integer"),
    "use_chat_template": (bool, "true or false"),
}


def is_saved_result(reference: str) -> bool:
    """Tell whether a `--base` or `--tuned` reference names a saved result: a path ending in `.json`."""
    return str(reference).lower().endswith(".json") and not Path(reference).expanduser().is_dir()


@dataclass(frozen=True)
class RolloutRecords:
    """The saved rollouts of one prompt, enough to embed them again.

    Attributes:
        texts: rollout texts in sampling order.
        lengths: `[M]` lengths `N_i`.
        entropy_rates: `[M]` entropy rates `r_i`, in nats.
    """

    texts: tuple[str, ...]
    lengths: torch.Tensor
    entropy_rates: torch.Tensor


@dataclass(frozen=True)
class SavedResult:
    """An `evaluate` result read back in nats.

    Attributes:
        path: the file as given.
        model: the model the result names, when it names one.
        settings: `{field: value}` for each of `SAMPLING_FIELDS`.
        running_positions: positions of the running entropy rates it was measured at.
        units: the units the file was written in.
        prompts: `(display text, messages or None)` of each prompt, in order.
        estimates: each prompt's estimates, in nats.
        rollouts: each prompt's rollout records.
        semantic: each prompt's semantic estimates, when the result has them.
        embedding_model: the embedding model of `semantic`.
    """

    path: str
    model: str | None
    settings: dict[str, Any]
    running_positions: tuple[int, ...]
    units: str
    prompts: list[tuple[str, list[dict] | None]]
    estimates: list[PromptEstimates]
    rollouts: list[RolloutRecords]
    semantic: list[SemanticPromptEstimates] | None
    embedding_model: str | None


def read_saved_result(path: str, option: str) -> SavedResult:
    """Read an `evaluate` JSON result, naming it as `option` (such as `--base`) in errors.

    Raises:
        `ValueError`: the file is missing, is not JSON, or is not an `evaluate` result.
    """
    where = f"{option} {path!r}"
    try:
        document = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{where} was not found; expected the JSON result of canopy-monitor evaluate.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{where} cannot be read: {getattr(error, 'strerror', None) or error}.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error.msg} at line {error.lineno}).") from None
    try:
        return _parse_result(document, path)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"{where} is not a result of canopy-monitor evaluate: {detail}.") from None


def _parse_result(document: Any, path: str) -> SavedResult:
    if not isinstance(document, dict):
        raise TypeError("the document is not a JSON object")
    config = document["config"]
    entries = document["prompts"]
    if not isinstance(entries, list) or not entries:
        raise ValueError("'prompts' is not a non-empty list")
    units = config.get("units", "nats")
    if units not in UNITS:
        raise ValueError(f"config.units is {units!r}, expected one of {', '.join(UNITS)}")
    settings = {name: config[name] for name in SAMPLING_FIELDS}
    _check_settings(settings)
    entries = convert_nested(entries, "nats", from_units=units)

    prompts, estimates, rollouts, semantic = [], [], [], []
    for entry in entries:
        prompts.append((entry["prompt"], entry.get("messages")))
        estimates.append(PromptEstimates.from_dict(entry))
        records = entry["rollouts"]
        rollouts.append(
            RolloutRecords(
                texts=tuple(str(record["text"]) for record in records),
                lengths=torch.tensor([int(record["length"]) for record in records], dtype=torch.long),
                entropy_rates=torch.tensor([_number(record["entropy_rate"]) for record in records], dtype=torch.float64),
            )
        )
        if "semantic" in entry:
            semantic.append(_semantic_from_dict(entry["semantic"], records))
    has_semantic = "semantic" in document and len(semantic) == len(entries)
    return SavedResult(
        path=path,
        model=config.get("model"),
        settings=settings,
        running_positions=tuple(int(position) for position in config.get("running_positions", ())),
        units=units,
        prompts=prompts,
        estimates=estimates,
        rollouts=rollouts,
        semantic=semantic if has_semantic else None,
        embedding_model=document["semantic"].get("embedding_model") if has_semantic else None,
    )


def _check_settings(settings: dict[str, Any]) -> None:
    """Raise `ValueError` unless each saved sampling setting has its type and a valid value."""
    for name, (expected, described) in _SETTING_TYPES.items():
        value = settings[name]
        # JSON true and false are Python bools, which are also ints.
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            raise ValueError(f"config.{name} is {value!r}, expected {described}")
    SamplingConfig(**settings)


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _semantic_from_dict(values: dict, records: list[dict]) -> SemanticPromptEstimates:
    """Rebuild a prompt's semantic estimates. The rollout diversities are stored with the rollouts."""
    arguments: dict[str, Any] = {}
    for item in fields(SemanticPromptEstimates):
        if item.name == "rollout_diversity":
            arguments[item.name] = tuple(_number(record.get("diversity")) for record in records)
        elif item.name == "undefined":
            arguments[item.name] = tuple(values.get("undefined", ()))
        elif item.name == "num_rollouts":
            arguments[item.name] = int(values[item.name])
        else:
            arguments[item.name] = _number(values[item.name])
    return SemanticPromptEstimates(**arguments)


def check_saved_prompts(result: SavedResult, prompts: Sequence[Prompt], option: str) -> None:
    """Raise `ValueError` unless `result` was measured on exactly `prompts`, in the same order."""
    if len(result.prompts) != len(prompts):
        raise ValueError(
            f"{option} {result.path!r} has {len(result.prompts)} prompts, but --prompts gives {len(prompts)}. "
            "Pass the prompts files and --num-prompts the result was measured with."
        )
    for index, ((display, messages), prompt) in enumerate(zip(result.prompts, prompts)):
        expected_messages = [dict(message) for message in prompt.messages] if prompt.messages is not None else None
        if display != prompt.display or (messages or None) != expected_messages:
            raise ValueError(
                f"prompt {index + 1} of {option} {result.path!r} is {_preview(display)}, but --prompts gives "
                f"{_preview(prompt.display)}. Both sides must be measured on the same prompts in the same order."
            )


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def embed_saved_rollouts(
    result: SavedResult, embedder: SentenceEmbedder, device: torch.device | str | None = None
) -> tuple[list[SemanticPromptEstimates], float]:
    """Embed a saved result's rollout texts in one pass and estimate each prompt's semantic figures.

    Returns:
        `(estimates, seconds)`: per prompt, in prompt order, and the wall time spent.
    """
    started = time.perf_counter()
    texts = [text for records in result.rollouts for text in records.texts]
    embeddings = embedder.embed(texts, device)  # [sum of M, D]
    estimates = []
    offset = 0
    for records in result.rollouts:
        count = len(records.texts)
        block = embeddings[offset : offset + count]  # [M, D]
        offset += count
        estimates.append(estimate_semantic_prompt(block, records.lengths, records.entropy_rates))
    return estimates, time.perf_counter() - started
