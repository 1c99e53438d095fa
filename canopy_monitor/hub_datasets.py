"""Training sets from the Hugging Face Hub, or from a local folder laid out like a Hub data set.

A recipe names the data set, its configuration and its split as `datasets.load_dataset`
takes them:

```yaml
dataset: {hub: openai/gsm8k, config_name: main, split: train, format: gsm8k}
```

Rows in one of TRL's data set types (`messages`, `prompt`/`completion`, `chosen`/`rejected`,
`prompt`) are used as they are. `format` names a conversion for a data set in another
layout. The one available, `gsm8k`, turns GSM8K's `question` and `answer` ("...
reasoning ... #### 72") into a conversational `prompt` and the final number as `answer`,
the column that the `exact_answer` reward reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from canopy_monitor.recipe import DatasetConfig, RecipeError
from canopy_monitor.rewards import answer_value

logger = logging.getLogger(__name__)

GSM8K_INSTRUCTION = "Solve the problem step by step, then write the final answer as a number on the last line."
GSM8K_ANSWER_MARK = "####"


def gsm8k_final_answer(solution: str) -> str:
    """Return the final answer of a GSM8K solution: the number after `####`, without thousands separators.

    Raises:
        ValueError: the solution has no `####` mark, or no number after it.
    """
    _, mark, final = solution.rpartition(GSM8K_ANSWER_MARK)
    if not mark:
        raise ValueError(f"the answer has no {GSM8K_ANSWER_MARK!r} mark before its final number: {solution[-80:]!r}")
    final = final.strip().replace(",", "")
    answer_value(final)  # Raises ValueError unless it is a single number.
    return final


def convert_gsm8k_row(row: dict[str, Any]) -> dict[str, Any]:
    """Convert a GSM8K row (`question`, `answer`) to a prompt-only row with the final answer."""
    question = row["question"].strip()
    return {
        "prompt": [{"role": "user", "content": f"{question}\n{GSM8K_INSTRUCTION}"}],
        "answer": gsm8k_final_answer(row["answer"]),
    }


# Conversions by the name a recipe gives in `dataset.format`, with the columns each reads.
ROW_FORMATS: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], tuple[str, ...]]] = {
    "gsm8k": (convert_gsm8k_row, ("question", "answer")),
}


def load_hub_dataset(config: DatasetConfig) -> Any:
    """Load the split that `config.hub`, `config.config_name` and `config.split` name, converted by `config.format`.

    `config.hub` is a Hub id such as `openai/gsm8k` or a local folder in the same
    layout, as `datasets.load_dataset` accepts it. Without network access, only data
    sets already in the `datasets` cache and local folders load.

    Returns:
        `datasets.Dataset`: the rows, in the data set's order.

    Raises:
        RecipeError: the data set, configuration or split cannot be loaded, `format` is
            unknown, or a row does not fit the conversion.
    """
    import datasets

    if config.format is not None and config.format not in ROW_FORMATS:
        known = ", ".join(sorted(ROW_FORMATS))
        raise RecipeError(f"Unknown dataset.format {config.format!r}. Available: {known}.")

    where = f"dataset.hub {config.hub!r} (config_name {config.config_name!r}, split {config.split!r})"
    try:
        dataset = datasets.load_dataset(config.hub, config.config_name, split=config.split)
    except (OSError, ValueError) as error:
        # Missing data sets and files raise FileNotFoundError, an unreachable Hub raises
        # ConnectionError, and an unknown configuration or split raises ValueError.
        raise RecipeError(f"Failed to load {where}: {_one_line(error)}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise RecipeError(f"{where} is not a single split: set dataset.split, e.g. 'train'.")

    if config.format is not None:
        dataset = _convert(dataset, config.format, where)
    logger.info("Loaded %d rows from %s.", len(dataset), where)
    return dataset


def _convert(dataset: Any, format_name: str, where: str) -> Any:
    convert, columns = ROW_FORMATS[format_name]
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise RecipeError(
            f"dataset.format {format_name!r} reads the columns {', '.join(columns)}, but {where} lacks "
            f"{', '.join(missing)} (it has {', '.join(dataset.column_names)})."
        )

    def convert_row(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            return convert(row)
        except ValueError as error:
            raise RecipeError(f"Row {index} of {where} does not fit dataset.format {format_name!r}: {error}") from None

    return dataset.map(convert_row, with_indices=True, remove_columns=dataset.column_names)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
