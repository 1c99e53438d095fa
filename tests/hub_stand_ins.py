"""Local folders laid out like the Hub data sets that the GPU recipes name, with a few rows each.

Each folder has the same configurations, splits and columns as its Hub original, and a
README.md whose `configs` metadata maps them to Parquet files, as on the Hub. The rows
are written for the tests and are not copied from the originals.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def write_hub_folder(root: Path, splits: dict[str, dict[str, list[dict]]]) -> Path:
    """Write `{config_name: {split: rows}}` as Parquet files with a README.md that declares them."""
    from datasets import Dataset

    configs = []
    for config_name, config_splits in splits.items():
        data_files = []
        for split, rows in config_splits.items():
            path = root / config_name / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            Dataset.from_list(rows).to_parquet(str(path))
            data_files.append({"split": split, "path": f"{config_name}/{split}-*"})
        configs.append({"config_name": config_name, "data_files": data_files})

    header = yaml.safe_dump({"configs": configs}, sort_keys=False)
    (root / "README.md").write_text(f"---\n{header}---\n\nStand-in for tests.\n", encoding="utf-8")
    return root


def gsm8k_rows(count: int) -> list[dict]:
    """Rows in GSM8K's layout: a `question`, and an `answer` with the reasoning and `#### <number>`."""
    rows = []
    for index in range(count):
        trays, rolls = index + 2, 12
        total = trays * rolls * 100
        rows.append(
            {
                "question": f"A baker makes {trays} trays of {rolls} boxes with 100 rolls each. How many rolls is that?",
                "answer": f"{trays} * {rolls} = <<{trays}*{rolls}={trays * rolls}>>{trays * rolls} boxes.\n"
                f"{trays * rolls} * 100 = <<{trays * rolls}*100={total}>>{total} rolls.\n#### {total:,}",
            }
        )
    return rows


def write_gsm8k(root: Path, count: int = 12) -> Path:
    """Write a stand-in for `openai/gsm8k`: configurations `main` and `socratic`, splits `train` and `test`."""
    rows = gsm8k_rows(count)
    return write_hub_folder(
        root,
        {"main": {"train": rows, "test": rows[:2]}, "socratic": {"train": rows[:3], "test": rows[:1]}},
    )


def write_ultrafeedback(root: Path, count: int = 12) -> Path:
    """Write a stand-in for `trl-lib/ultrafeedback_binarized`: conversational preferences with an implicit prompt."""
    rows = []
    for index in range(count):
        question = {"role": "user", "content": f"what is w{index} ?"}
        rows.append(
            {
                "chosen": [question, {"role": "assistant", "content": f"w{index} is the answer ."}],
                "rejected": [question, {"role": "assistant", "content": "hello world"}],
                "score_chosen": 8.0,
                "score_rejected": 3.5,
            }
        )
    return write_hub_folder(root, {"default": {"train": rows, "test": rows[:2]}})


def write_capybara(root: Path, count: int = 12) -> Path:
    """Write a stand-in for `trl-lib/Capybara`: multi-turn conversations in a `messages` column."""
    rows = []
    for index in range(count):
        messages = [
            {"role": "user", "content": f"tell me a story about w{index}"},
            {"role": "assistant", "content": f"w{index} is in a story ."},
            {"role": "user", "content": "and then ?"},
            {"role": "assistant", "content": "the end ."},
        ]
        rows.append({"source": "stand-in", "messages": messages, "num_turns": 4})
    return write_hub_folder(root, {"default": {"train": rows, "test": rows[:2]}})
