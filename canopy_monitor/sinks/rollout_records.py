"""Per-rollout records of a few monitoring points, kept on disk for `canopy-monitor report`.

Each point is one JSON file, `<output_dir>/canopy_monitor/rollouts/step-00000030.json`:

```
{"version": 1, "step": 30, "units": "nats", "max_new_tokens": 96, "num_rollouts": 8,
 "prompts": [{"prompt": "...", "lengths": [...], "entropy_sums": [...], "entropy_rates": [...],
              "truncated": [...], "diversity": [...] or null, "texts": [...]}, ...]}
```

`lengths`, `entropy_sums`, `entropy_rates`, `truncated` and `diversity` contain every
rollout of the prompt, and `texts` the first few, each cut to a maximum length.
Only the first point and the latest ones are kept, so the folder stays bounded
however long the run is. Files are written atomically, so a reader of a run that
is still training reads only whole files.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from ..measurement import Measurement
from .metrics import json_safe
from .units import unit_factor

RECORDS_VERSION = 1
DEFAULT_KEEP_POINTS = 5
DEFAULT_TEXTS_PER_PROMPT = 4
DEFAULT_TEXT_CHARS = 1000
_FILE_NAME = re.compile(r"^step-(\d+)\.json$")


def check_keep_points(value, name: str = "rollout_record_points") -> int:
    """Return `value` when it is 0 or an integer of at least 2, else raise `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value == 1 or value < 0:
        raise ValueError(
            f"{name} must be 0 (keep none) or an integer of at least 2 (the first point and the "
            f"latest ones), got {value!r}."
        )
    return value


def rollout_record(
    measurement: Measurement,
    step: int,
    *,
    units: str = "nats",
    texts_per_prompt: int = DEFAULT_TEXTS_PER_PROMPT,
    text_chars: int = DEFAULT_TEXT_CHARS,
) -> dict:
    """Return the per-rollout record of one monitoring point, entropies in `units`."""
    factor = unit_factor(units)
    semantic = measurement.semantic
    prompts = []
    for index, rollouts in enumerate(measurement.rollouts):
        stats = rollouts.stats
        diversity = None
        if semantic is not None:
            diversity = [float(value) for value in semantic.prompts[index].rollout_diversity]
        prompts.append(
            {
                "prompt": rollouts.prompt.display,
                "lengths": [int(value) for value in stats.lengths],
                "entropy_sums": [float(value) * factor for value in stats.entropy_sums],
                "entropy_rates": [float(value) * factor for value in stats.entropy_rates],
                "truncated": [bool(value) for value in stats.truncated],
                "diversity": diversity,
                "texts": [text[:text_chars] for text in rollouts.texts[:texts_per_prompt]],
            }
        )
    return {
        "version": RECORDS_VERSION,
        "step": int(step),
        "units": units,
        "max_new_tokens": measurement.config.max_new_tokens,
        "num_rollouts": measurement.config.num_rollouts,
        "prompts": prompts,
    }


class RolloutRecords:
    """The folder of per-rollout records: write one point, keep the first and the latest ones.

    Args:
        directory (`str` or `os.PathLike`): the folder, created on the first write.
        keep_points (`int`): points kept, the first one included; 0 writes nothing.
    """

    def __init__(self, directory: str | os.PathLike, keep_points: int = DEFAULT_KEEP_POINTS) -> None:
        self.directory = Path(directory)
        self.keep_points = check_keep_points(keep_points)

    def path(self, step: int) -> Path:
        return self.directory / f"step-{int(step):08d}.json"

    def steps(self) -> list[int]:
        """Return the steps with a record on disk, in increasing order."""
        if not self.directory.is_dir():
            return []
        steps = []
        for entry in self.directory.iterdir():
            match = _FILE_NAME.match(entry.name)
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def write(self, record: dict) -> None:
        """Write `record` atomically, then delete the points between the first and the latest ones."""
        if self.keep_points == 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(record["step"])
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(json_safe(record), allow_nan=False), encoding="utf-8")
        os.replace(temporary, path)
        steps = self.steps()
        for step in steps[1 : max(1, len(steps) - (self.keep_points - 1))]:
            self.path(step).unlink(missing_ok=True)

    def drop_after(self, step: int) -> None:
        """Delete the records of the points after `step`, which a resumed run takes again."""
        for recorded in self.steps():
            if recorded > step:
                self.path(recorded).unlink(missing_ok=True)


def read_rollout_records(directory: str | os.PathLike) -> list[dict]:
    """Read every per-rollout record in `directory`, in step order.

    A file that disappears or cannot be parsed while it is read (the run is still
    training and pruned it) is skipped. `null` figures become NaN.
    """
    folder = RolloutRecords(directory, keep_points=0)
    records = []
    for step in folder.steps():
        path = folder.path(step)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or not isinstance(record.get("prompts"), list):
            continue
        for prompt in record["prompts"]:
            if not isinstance(prompt, dict):
                continue
            for key in ("entropy_sums", "entropy_rates", "diversity"):
                if isinstance(prompt.get(key), list):
                    prompt[key] = [math.nan if value is None else value for value in prompt[key]]
        records.append(record)
    return records
