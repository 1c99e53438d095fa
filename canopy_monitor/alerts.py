"""Alerts when a headline figure moves more than a set amount between two monitoring points."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

# Figures that can raise an alert: the callback argument that sets each threshold, and its display name.
ALERT_FIGURES = {
    "ce_star": ("alert_ce_star_change", "CE*"),
    "rho_length_rate": ("alert_rho_change", "rho(N, r)"),
}


@dataclass(frozen=True)
class FigureMove:
    """A figure that moved more than its threshold between two consecutive points."""

    name: str
    previous_step: int
    step: int
    previous: float
    current: float
    threshold: float

    @property
    def delta(self) -> float:
        return self.current - self.previous

    def title(self) -> str:
        """Return a short title, under W&B's 64-character limit for alert titles."""
        return f"canopy-monitor: {ALERT_FIGURES[self.name][1]} moved at step {self.step}"

    def text(self, units: str) -> str:
        argument, display = ALERT_FIGURES[self.name]
        unit = f" {units}" if self.name == "ce_star" else ""
        return (
            f"{display} moved by {self.delta:+.4g}{unit} between steps {self.previous_step} and {self.step} "
            f"(from {self.previous:.4g} to {self.current:.4g}), more than {argument}={self.threshold:g}."
        )


def check_alert_threshold(value, name: str) -> float | None:
    """Return `value` as a float when it is `None` or a positive finite number, else raise `ValueError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number or None (no alert), got {value!r}.")
    return float(value)


def figure_moves(
    previous_step: int, previous: dict, step: int, current: dict, thresholds: dict[str, float | None]
) -> list[FigureMove]:
    """Return the figures that moved by more than their threshold from `previous` to `current`.

    `previous` and `current` map the callback's scalar names (`canopy/ce_star`) to
    values. `thresholds` maps figure names (`ce_star`) to thresholds in the logged
    units, or to `None` for no alert. A figure that is NaN or missing at either
    point raises no alert.
    """
    moves = []
    for name, threshold in thresholds.items():
        if threshold is None:
            continue
        before = previous.get("canopy/" + name)
        after = current.get("canopy/" + name)
        if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
            continue
        if abs(after - before) > threshold:
            moves.append(FigureMove(name, previous_step, step, float(before), float(after), threshold))
    return moves
