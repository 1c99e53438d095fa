"""The monitoring history: one JSON line per monitoring point."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .metrics import json_safe


class HistoryWriter:
    """Append `{"step": ..., "metrics": {...}, ...}` lines to a JSONL file.

    Each line is written and flushed in one call, so a reader sees whole lines
    while training goes on. NaN figures are written as `null`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, step: int, metrics: dict[str, float], **fields) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json_safe({"step": int(step), "metrics": metrics, **fields})
        line = json.dumps(record, allow_nan=False) + "\n"
        # A line cut short by a crash gets its own line ending first, so that it
        # cannot swallow this record.
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)

    def keep_until(self, step: int) -> list[dict]:
        """Drop the records after `step`, rewriting the file atomically, and return the rest.

        A run resumed from the checkpoint of `step` repeats the steps after it, so
        their earlier records would otherwise appear twice or out of order.
        """
        records = read_history(self.path)
        remaining = [record for record in records if record["step"] <= step]
        if len(remaining) < len(records):
            self.replace(remaining)
        return remaining

    def replace(self, records: list[dict]) -> None:
        """Write `records` in place of the file's contents, atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        lines = "".join(json.dumps(json_safe(record), allow_nan=False) + "\n" for record in records)
        temporary.write_text(lines, encoding="utf-8")
        os.replace(temporary, self.path)

    def steps(self) -> list[int]:
        """Return the steps already recorded, in file order."""
        return [record["step"] for record in read_history(self.path)]


def read_history(path: str | os.PathLike) -> list[dict]:
    """Read every monitoring point of a history file; a missing file is an empty history.

    A line cut short by a crash, one that is not valid UTF-8, or one without an
    integer `step` is skipped.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    # Invalid bytes become U+FFFD, so the line fails to parse and is skipped.
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        # Only monitoring points count; any other JSON value on a line is skipped.
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records
