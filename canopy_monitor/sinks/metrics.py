"""Names and JSON form of the logged figures."""

from __future__ import annotations

import math

from ..estimators import FigureChange, PooledEstimates, PooledSemantic
from .units import convert_flat

METRIC_PREFIX = "canopy/"
SEMANTIC_PREFIX = "semantic/"

# Figures whose change since the first monitoring point is logged as `canopy/change/<name>`.
CHANGE_FIGURES = (
    "ce_star",
    "entropy_rate",
    "mean_length",
    "rho_length_rate",
    "length_driven",
    "conveyance",
    "truncation_rate",
)


def scalar_metrics(
    pooled: PooledEstimates,
    *,
    units: str = "nats",
    change: dict[str, FigureChange] | None = None,
    semantic: PooledSemantic | None = None,
) -> dict[str, float]:
    """Return the pooled figures as `canopy/<name>` scalars, e.g. `canopy/ce_star`.

    Each figure with a bootstrap interval is followed by `canopy/<name>_ci_low` and
    `canopy/<name>_ci_high`. Completed-only figures are `canopy/completed/<name>`.
    With `change`, the figures of `CHANGE_FIGURES` add `canopy/change/<name>` (the
    difference from the earlier measurement) and, when `pooled` has intervals, its
    paired interval. With `semantic`, its figures and intervals are added as
    `canopy/semantic/<name>`. Entropy-valued figures are converted to `units`, and
    figures per nat inversely. `num_prompts` and `total_rollouts` are counts of the
    set-up, not figures, and are left out.
    """
    metrics: dict[str, float] = {}
    for name, value in pooled.figures().items():
        metrics[name] = value
        if name in pooled.intervals:
            metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = pooled.intervals[name]
    if semantic is not None:
        for name, value in semantic.figures().items():
            metrics[SEMANTIC_PREFIX + name] = value
            if name in semantic.intervals:
                low, high = semantic.intervals[name]
                metrics[f"{SEMANTIC_PREFIX}{name}_ci_low"] = low
                metrics[f"{SEMANTIC_PREFIX}{name}_ci_high"] = high
    for name in CHANGE_FIGURES:
        if change is not None and name in change:
            metrics[f"change/{name}"] = change[name].delta
            # Change intervals come from the same bootstrap as the figures' own.
            if pooled.bootstrap_samples > 0:
                metrics[f"change/{name}_ci_low"] = change[name].ci_low
                metrics[f"change/{name}_ci_high"] = change[name].ci_high
    return {METRIC_PREFIX + name: float(value) for name, value in convert_flat(metrics, units).items()}


def json_safe(value):
    """Replace NaN and infinities by `None`, recursively, so the result is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
