"""Display units of entropy-valued figures: nats (the default) or bits.

Every estimator works in nats. Conversion happens only when figures leave the
program (logged scalars, history, JSON), by dividing entropy-valued figures by
`ln 2` (and multiplying figures per nat by it). Lengths, shares, correlations, the
variance ratio, the branching factor, the generation perplexity and semantic
diversity have no entropy unit and are never converted.
"""

from __future__ import annotations

import math

UNITS = ("nats", "bits")

# Figures measured in nats (or nats per token): entropies, entropy rates, the
# decomposition parts, and the covariance of length with the entropy rate.
ENTROPY_VALUED = frozenset(
    {
        "ce_star",
        "ce_star_se",
        "ce_star_mc",
        "ce_star_mc_se",
        "entropy_rate",
        "entropy_rate_short",
        "entropy_rate_medium",
        "entropy_rate_long",
        "length_rate_covariance",
        "length_driven",
        "conveyance",
        "entropy_sum",
        "surprisal_sum",
    }
)
# Figures measured per nat: the slope of semantic diversity on the entropy rate. They
# are multiplied by `ln 2` where entropies are divided by it.
PER_ENTROPY = frozenset({"diversity_rate_slope"})
_RUNNING_RATE = "running_entropy_rate"
_PREFIXES = ("canopy/", "completed/", "change/", "semantic/")
_SUFFIXES = ("_ci_low", "_ci_high")


def check_units(units: str) -> str:
    """Return `units` if it is `"nats"` or `"bits"`, else raise `ValueError`."""
    if units not in UNITS:
        raise ValueError(f"units must be 'nats' or 'bits', got {units!r}.")
    return units


def unit_factor(units: str, from_units: str = "nats") -> float:
    """Return the number that turns a value in `from_units` into `units`."""
    per_nat = {"nats": 1.0, "bits": 1.0 / math.log(2.0)}
    return per_nat[check_units(units)] / per_nat[check_units(from_units)]


def _base_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def is_entropy_valued(name: str) -> bool:
    """Tell whether a flat figure name, such as `canopy/completed/ce_star_ci_low`, is in nats."""
    name = _base_name(name)
    return name in ENTROPY_VALUED or name.startswith(_RUNNING_RATE)


def is_per_entropy(name: str) -> bool:
    """Tell whether a flat figure name, such as `canopy/semantic/diversity_rate_slope`, is per nat."""
    return _base_name(name) in PER_ENTROPY


def _name_factor(name: str, factor: float) -> float:
    if is_entropy_valued(name):
        return factor
    if is_per_entropy(name):
        return 1.0 / factor
    return 1.0


def convert_flat(values: dict[str, float], units: str, from_units: str = "nats") -> dict[str, float]:
    """Convert flat `{name: value}` figures from `from_units` to `units`."""
    factor = unit_factor(units, from_units)
    if factor == 1.0:
        return dict(values)
    return {name: value * _name_factor(name, factor) for name, value in values.items()}


def convert_nested(document, units: str, from_units: str = "nats"):
    """Convert the entropy-valued figures of a JSON-like document from `from_units` to `units`.

    Entropy-valued keys (see `ENTROPY_VALUED`) and `running_entropy_rate` maps are
    scaled, and per-nat keys (see `PER_ENTROPY`) scaled inversely. An `intervals` map
    is scaled entry by entry, by the names of its figures. Everything else is copied
    unchanged.
    """
    factor = unit_factor(units, from_units)
    if factor == 1.0:
        return document
    return _scale(document, factor)


def _scale_value(value, factor: float):
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value * factor
    if isinstance(value, (list, tuple)):
        return [_scale_value(item, factor) for item in value]
    if isinstance(value, dict):
        return {key: _scale_value(item, factor) for key, item in value.items()}
    return value


def _scale(document, factor: float):
    if isinstance(document, list):
        return [_scale(item, factor) for item in document]
    if not isinstance(document, dict):
        return document
    converted = {}
    for key, value in document.items():
        if key in ENTROPY_VALUED or key == _RUNNING_RATE:
            converted[key] = _scale_value(value, factor)
        elif key in PER_ENTROPY:
            converted[key] = _scale_value(value, 1.0 / factor)
        elif key == "intervals" and isinstance(value, dict):
            converted[key] = {name: _scale_value(bounds, _name_factor(name, factor)) for name, bounds in value.items()}
        else:
            converted[key] = _scale(value, factor)
    return converted
