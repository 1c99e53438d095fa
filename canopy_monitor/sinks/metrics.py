"""Names and JSON form of the logged figures."""

from __future__ import annotations

import math

from ..estimators import PooledEstimates

METRIC_PREFIX = "canopy/"


def scalar_metrics(pooled: PooledEstimates) -> dict[str, float]:
    """Return the pooled figures as `canopy/<field>` scalars, e.g. `canopy/ce_star`.

    `num_prompts` and `total_rollouts` are counts of the set-up, not figures, and are
    left out.
    """
    scalars = pooled.scalars()
    scalars.pop("num_prompts")
    scalars.pop("total_rollouts")
    return {METRIC_PREFIX + name: float(value) for name, value in scalars.items()}


def json_safe(value):
    """Replace NaN and infinities by `None`, recursively, so the result is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
