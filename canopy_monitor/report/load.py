"""Read a monitored run from disk for `canopy-monitor report`, while it may still be training.

A run directory is the trainer's `output_dir`. The callback writes into
`<output_dir>/canopy_monitor/`: `history.jsonl` (one line per monitoring point),
`rollouts/step-XXXXXXXX.json` (per-rollout records of the first and latest points)
and `run.json` (model, trainer and monitor settings, absent in runs of older
versions). A run that is still training may append a history line, or delete a
rollout record, while they are read: a partial last line and a vanished record are
skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..sinks.history import read_history
from ..sinks.rollout_records import read_rollout_records
from ..sinks.units import check_units, convert_flat, unit_factor

logger = logging.getLogger(__name__)

MONITOR_FOLDER = "canopy_monitor"
HISTORY_FILE = "history.jsonl"
RUN_INFO_FILE = "run.json"
ROLLOUTS_FOLDER = "rollouts"
METRIC_PREFIX = "canopy/"


@dataclass
class Series:
    """One figure over training: `steps`, `values`, and its interval bounds when they were logged.

    Every array has one entry per step. NaN marks a value that was undefined (`null`
    in the history) or not logged at that point.
    """

    steps: np.ndarray
    values: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    @property
    def has_interval(self) -> bool:
        return self.low is not None and bool(np.isfinite(self.low).any() or np.isfinite(self.high).any())


@dataclass
class RolloutPoint:
    """The per-rollout record of one monitoring point, flattened over prompts.

    `prompt_index[i]` is the position of rollout `i`'s prompt in the record, and
    `cap` the length cap `T` (`max_new_tokens`), `None` when the record lacks it.
    """

    step: int
    lengths: np.ndarray
    entropy_rates: np.ndarray
    truncated: np.ndarray
    prompt_index: np.ndarray
    cap: int | None
    num_prompts: int


@dataclass
class Run:
    """A monitored run as read from disk, every entropy in `units`.

    `points` are the history's monitoring points in step order, each with `metrics`
    converted to `units` and `None` replaced by NaN. `info` is `run.json`, or `None`
    when the run has none.
    """

    directory: Path
    monitor_directory: Path
    units: str
    points: list[dict]
    rollouts: list[RolloutPoint] = field(default_factory=list)
    info: dict | None = None

    @property
    def steps(self) -> list[int]:
        return [point["step"] for point in self.points]

    @property
    def settings(self) -> dict:
        """The monitor's settings from `run.json`, empty when it is missing."""
        monitor = (self.info or {}).get("monitor")
        return monitor if isinstance(monitor, dict) else {}

    @property
    def max_steps(self) -> int | None:
        value = (self.info or {}).get("max_steps")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    @property
    def cap(self) -> int | None:
        """The length cap `T`, from `run.json` or else from the rollout records."""
        value = self.settings.get("max_new_tokens")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        caps = [point.cap for point in self.rollouts if point.cap is not None]
        return max(caps) if caps else None

    @property
    def confidence(self) -> float | None:
        """Coverage of the bootstrap intervals from `run.json`, `None` when it is missing."""
        bootstrap = self.settings.get("bootstrap")
        value = bootstrap.get("confidence") if isinstance(bootstrap, dict) else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def has_metric(self, name: str) -> bool:
        """Tell whether any point logged `canopy/<name>`."""
        return any(METRIC_PREFIX + name in point["metrics"] for point in self.points)

    def has_intervals(self) -> bool:
        """Tell whether the run logged bootstrap intervals (it did not with `bootstrap_samples=0`)."""
        return self.has_metric("ce_star_ci_low")

    def value(self, point: dict, name: str) -> float:
        """Return `canopy/<name>` at `point`, NaN when it is undefined or was not logged."""
        return point["metrics"].get(METRIC_PREFIX + name, math.nan)

    def series(self, name: str, *, measured_only: bool = False) -> Series:
        """Return `canopy/<name>` over training, with `_ci_low` and `_ci_high` when logged.

        With `measured_only`, only the points that logged the figure are kept: semantic
        figures are measured at every k-th point only.
        """
        points = self.points
        if measured_only:
            points = [point for point in points if METRIC_PREFIX + name in point["metrics"]]
        steps = np.array([point["step"] for point in points], dtype=float)
        values = np.array([self.value(point, name) for point in points], dtype=float)
        low = high = None
        if self.has_metric(f"{name}_ci_low"):
            low = np.array([self.value(point, f"{name}_ci_low") for point in points], dtype=float)
            high = np.array([self.value(point, f"{name}_ci_high") for point in points], dtype=float)
        return Series(steps, values, low, high)


def find_monitor_directory(run_directory: str | os.PathLike) -> Path:
    """Return the folder that contains the history of `run_directory`.

    `run_directory` is the trainer's `output_dir`, or its `canopy_monitor` folder.

    Raises:
        `FileNotFoundError`: the directory, or a history in it, does not exist.
    """
    directory = Path(run_directory)
    if not directory.exists():
        raise FileNotFoundError(f"run directory not found: {directory}")
    if not directory.is_dir():
        raise FileNotFoundError(f"not a directory: {directory} (expected the trainer's output_dir)")
    for candidate in (directory / MONITOR_FOLDER, directory):
        if (candidate / HISTORY_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no monitoring history in {directory}: expected {directory / MONITOR_FOLDER / HISTORY_FILE}, "
        "which CanopyMonitorCallback writes at each monitoring point"
    )


def _complete_lines(path: Path) -> int:
    """Return the number of non-blank lines of `path`, leaving out a last line without its line ending.

    A run that is still training may be writing that last line, so it is not yet a
    point to warn about.
    """
    text = path.read_bytes()
    lines = text.split(b"\n")
    # After the last line ending, `split` leaves the partial line, or b"" when there is none.
    return sum(1 for line in lines[:-1] if line.strip())


def load_run(run_directory: str | os.PathLike) -> Run:
    """Read the history, rollout records and `run.json` of a monitored run.

    Entropies are converted to the unit of the last monitoring point, should an
    earlier part of the run (before a resume) have used the other one.

    Raises:
        `FileNotFoundError`: the directory or its history does not exist.
        `ValueError`: the history has no complete monitoring point.
    """
    monitor_directory = find_monitor_directory(run_directory)
    history_path = monitor_directory / HISTORY_FILE
    raw_points = read_history(history_path)
    skipped = _complete_lines(history_path) - len(raw_points)
    if not raw_points:
        if skipped > 0:
            raise ValueError(
                f"the history {history_path} has no readable monitoring point: {skipped} line(s) are not "
                "monitoring points written by CanopyMonitorCallback"
            )
        raise ValueError(f"the history {history_path} has no complete monitoring point yet")
    if skipped > 0:
        logger.warning(
            "%d line(s) of %s are not monitoring points written by CanopyMonitorCallback and were left out",
            skipped,
            history_path,
        )

    # A run resumed from a checkpoint may have written a step twice, and then the later line wins.
    by_step = {point["step"]: point for point in raw_points}
    info = _read_run_info(monitor_directory / RUN_INFO_FILE)
    units = _point_units(raw_points[-1], history_path)
    points = [_converted_point(by_step[step], units, history_path) for step in sorted(by_step)]

    # The records are read after the history, so a point taken in between has a
    # record but no history line. The figures label each record by its own step.
    records = read_rollout_records(monitor_directory / ROLLOUTS_FOLDER)
    rollouts = [point for point in (_rollout_point(record, units) for record in records) if point is not None]

    directory = monitor_directory.parent if monitor_directory.name == MONITOR_FOLDER else monitor_directory
    return Run(
        directory=directory,
        monitor_directory=monitor_directory,
        units=units,
        points=points,
        rollouts=rollouts,
        info=info,
    )


def _read_run_info(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _point_units(point: dict, history_path: Path) -> str:
    units = point.get("units", "nats")
    try:
        return check_units(units)
    except ValueError:
        raise ValueError(
            f"invalid units {units!r} at step {point['step']} of {history_path}, expected 'nats' or 'bits'"
        ) from None


def _as_float(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _converted_point(point: dict, units: str, history_path: Path) -> dict:
    metrics = point.get("metrics")
    metrics = {name: _as_float(value) for name, value in metrics.items()} if isinstance(metrics, dict) else {}
    metrics = convert_flat(metrics, units, from_units=_point_units(point, history_path))
    return {**point, "units": units, "metrics": metrics}


def _rollout_point(record: dict, units: str) -> RolloutPoint | None:
    """Flatten one rollout record over its prompts, or return `None` when it has no usable rollout."""
    try:
        factor = unit_factor(units, from_units=record.get("units", "nats"))
    except ValueError:
        return None
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None

    lengths, rates, truncated, prompt_index = [], [], [], []
    for index, prompt in enumerate(record["prompts"]):
        if not isinstance(prompt, dict):
            continue
        prompt_lengths = prompt.get("lengths")
        prompt_rates = prompt.get("entropy_rates")
        if not isinstance(prompt_lengths, list) or not isinstance(prompt_rates, list):
            continue
        if len(prompt_lengths) != len(prompt_rates):
            continue
        prompt_truncated = prompt.get("truncated")
        if not isinstance(prompt_truncated, list) or len(prompt_truncated) != len(prompt_lengths):
            prompt_truncated = [False] * len(prompt_lengths)
        lengths.extend(_as_float(value) for value in prompt_lengths)
        rates.extend(_as_float(value) * factor for value in prompt_rates)
        truncated.extend(bool(value) for value in prompt_truncated)
        prompt_index.extend([index] * len(prompt_lengths))
    if not lengths:
        return None

    cap = record.get("max_new_tokens")
    return RolloutPoint(
        step=step,
        lengths=np.array(lengths, dtype=float),
        entropy_rates=np.array(rates, dtype=float),
        truncated=np.array(truncated, dtype=bool),
        prompt_index=np.array(prompt_index, dtype=int),
        cap=cap if isinstance(cap, int) and not isinstance(cap, bool) else None,
        num_prompts=len(record["prompts"]),
    )
