"""The text of `canopy-monitor report`: facts about the run and the table of headline figures."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .figures import Metric, semantic_metrics
from .load import Run

# Longer lists of steps show their first and last few only.
MAX_LISTED_STEPS = 12


def format_value(value: float) -> str:
    """Format a figure with 4 significant digits, and NaN as "undefined"."""
    return f"{value:.4g}" if math.isfinite(value) else "undefined"


def format_change(value: float) -> str:
    return f"{value:+.4g}" if math.isfinite(value) else "undefined"


def format_interval(low: float, high: float) -> str:
    """Format `[low, high]`, or return an empty string when neither bound is defined."""
    if not (math.isfinite(low) or math.isfinite(high)):
        return ""
    return f"[{format_value(low)}, {format_value(high)}]"


def format_steps(steps: list[int]) -> str:
    if len(steps) > MAX_LISTED_STEPS:
        half = MAX_LISTED_STEPS // 2
        return ", ".join(map(str, steps[:half])) + ", …, " + ", ".join(map(str, steps[-half:]))
    return ", ".join(map(str, steps))


def _ordinal(number: int) -> str:
    if number == 1:
        return "every"
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"every {number}{suffix}"


def training_status(run: Run) -> str:
    """Say whether the last monitoring point is at the run's `max_steps`."""
    last = run.steps[-1]
    if run.max_steps is None:
        return (
            f"The last monitoring point is at step {last}. The run's max_steps is unknown (no run.json), "
            "so this page cannot tell whether training had finished."
        )
    if last >= run.max_steps:
        return f"The last monitoring point is at step {last} of max_steps {run.max_steps}: training had finished."
    return (
        f"The last monitoring point is at step {last} of max_steps {run.max_steps}: the run was still "
        "training when this page was written, or it stopped early."
    )


def run_facts(run: Run) -> list[tuple[str, str]]:
    """Return `(label, text)` rows describing the run and how it was monitored."""
    info = run.info or {}
    settings = run.settings
    last = run.points[-1]
    facts = [("run directory", str(run.directory))]
    for key, label in (("run_name", "run name"), ("model", "model"), ("trainer", "trainer")):
        if info.get(key):
            facts.append((label, str(info[key])))
    if info.get("started"):
        started = str(info["started"])
        resumed_at = info.get("started_at_step")
        if isinstance(resumed_at, int) and resumed_at > 0:
            started += f" (resumed at step {resumed_at})"
        facts.append(("started", started))
    facts.append(("max_steps", str(run.max_steps) if run.max_steps is not None else "unknown (no run.json)"))
    facts.append(("monitoring points", f"{len(run.steps)}, at steps {format_steps(run.steps)}"))
    facts.append(("units", f"{run.units} (entropies and entropy rates)"))
    facts.append(("prompts × rollouts", _prompts_and_rollouts(run, last)))
    cap = run.cap
    facts.append(("length cap T", f"{cap} tokens" if cap is not None else "unknown"))
    policy = _decoding_policy(settings)
    if policy:
        facts.append(("decoding policy", policy))
    facts.append(("intervals", _interval_text(run)))
    facts.append(("semantic diversity", _semantic_text(run)))
    recorded = [point.step for point in run.rollouts]
    facts.append(("rollout records", f"steps {format_steps(recorded)}" if recorded else "none"))
    return facts


def _prompts_and_rollouts(run: Run, point: dict) -> str:
    prompts = point.get("num_prompts")
    total = point.get("total_rollouts")
    per_prompt = run.settings.get("num_rollouts")
    if isinstance(prompts, int) and isinstance(total, int) and prompts > 0:
        if not isinstance(per_prompt, int) and total % prompts == 0:
            per_prompt = total // prompts
        if isinstance(per_prompt, int):
            return f"{prompts} × {per_prompt} = {total} rollouts per point"
        return f"{prompts} prompts, {total} rollouts per point"
    return "unknown"


def _decoding_policy(settings: dict) -> str:
    parts = []
    if "temperature" in settings:
        parts.append(f"temperature {settings['temperature']}")
    if "top_k" in settings:
        parts.append(f"top-k {settings['top_k']}" + (" (off)" if settings["top_k"] in (0, None) else ""))
    if "top_p" in settings:
        parts.append(f"top-p {settings['top_p']}" + (" (off)" if settings["top_p"] in (1, 1.0, None) else ""))
    if "seed" in settings:
        parts.append(f"seed {settings['seed']}")
    return ", ".join(parts)


def _interval_text(run: Run) -> str:
    if not run.has_intervals():
        return "none (the run used bootstrap_samples=0)"
    bootstrap = run.settings.get("bootstrap")
    text = "percentile bootstrap over prompts"
    if run.confidence is not None:
        text = f"{run.confidence:.0%} {text}"
    if isinstance(bootstrap, dict) and isinstance(bootstrap.get("samples"), int):
        text += f", {bootstrap['samples']} resamples"
    return text + ", and a paired bootstrap for changes since the first point"


def _semantic_text(run: Run) -> str:
    steps = [int(step) for step in run.series("semantic/diversity", measured_only=True).steps]
    if not steps:
        return "not measured"
    text = f"measured at steps {format_steps(steps)}"
    every = run.settings.get("semantic_every_n_points")
    if isinstance(every, int) and every > 0:
        text += f" ({_ordinal(every)} point)"
    if run.settings.get("embedding_model"):
        text += f", embedding model {run.settings['embedding_model']}"
    return text


@dataclass
class TableRow:
    """One row of the headline table: each cell is `(value, interval)` text, with a `step` where it differs."""

    label: str
    first: tuple[str, str]
    last: tuple[str, str]
    change: tuple[str, str]
    first_step: int | None = None
    last_step: int | None = None


def table_metrics(run: Run) -> list[Metric]:
    """Return the figures of the headline table, semantic ones only when the run measured them."""
    units = run.units
    metrics = [
        Metric("ce_star", "canopy entropy CE*", units),
        Metric("entropy_rate", "entropy rate r", f"{units}/token"),
        Metric("mean_length", "mean length E[N]", "tokens"),
        Metric("rho_length_rate", "length-rate correlation ρ(N, r)", ""),
        Metric("length_driven", "length-driven part E[N]·E[r]", units),
        Metric("conveyance", "conveyance part Cov(N, r)", units),
        Metric("truncation_rate", "truncation rate", "share"),
    ]
    metrics += [
        Metric(metric.name, metric.label, "")
        for metric in semantic_metrics()
        if run.has_metric(metric.name)
    ]
    return metrics


def _cell(run: Run, point: dict, name: str) -> tuple[str, str]:
    return (
        format_value(run.value(point, name)),
        format_interval(run.value(point, f"{name}_ci_low"), run.value(point, f"{name}_ci_high")),
    )


def headline_rows(run: Run) -> list[TableRow]:
    """Return the first and last value of each headline figure and its change since the first point.

    The change and its paired interval are the logged `canopy/change/<name>` of the
    last point. Semantic figures have no logged change, so their row shows the plain
    difference of the first and last points that measured them, without an interval.
    """
    rows = []
    for metric in table_metrics(run):
        points = [point for point in run.points if f"canopy/{metric.name}" in point["metrics"]]
        if not points:
            points = run.points
        first, last = points[0], points[-1]
        label = f"{metric.label} ({metric.axis_label})" if metric.axis_label else metric.label
        if first is last:
            change = ("—", "one point only")
        elif run.has_metric(f"change/{metric.name}"):
            change = (
                format_change(run.value(last, f"change/{metric.name}")),
                format_interval(
                    run.value(last, f"change/{metric.name}_ci_low"), run.value(last, f"change/{metric.name}_ci_high")
                ),
            )
        else:
            difference = run.value(last, metric.name) - run.value(first, metric.name)
            change = (format_change(difference), "difference, no paired interval")
        rows.append(
            TableRow(
                label=label,
                first=_cell(run, first, metric.name),
                last=_cell(run, last, metric.name),
                change=change,
                first_step=first["step"] if first["step"] != run.steps[0] else None,
                last_step=last["step"] if last["step"] != run.steps[-1] else None,
            )
        )
    return rows


def undefined_reasons(run: Run) -> list[str]:
    """Return the last point's reasons for undefined figures, each with its count of prompts."""
    point = run.points[-1]
    undefined = point.get("undefined")
    if not isinstance(undefined, dict):
        return []
    prompts = point.get("num_prompts")
    lines = []
    for reason, count in undefined.items():
        if isinstance(prompts, int):
            lines.append(f"{reason} ({count} of {prompts} prompts)")
        else:
            lines.append(f"{reason} ({count} prompts)")
    return lines
