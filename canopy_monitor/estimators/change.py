"""Change of the pooled figures between two measurements of the same prompts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .bootstrap import BootstrapConfig, percentile_intervals, resample_indices
from .pooled import NO_INTERVAL, figure_support, pool_columns, prompt_columns
from .prompt import PromptEstimates


@dataclass(frozen=True)
class FigureChange:
    """One pooled figure at two measurements and its change.

    Attributes:
        before, after: the pooled figure of each side.
        delta: `after - before`.
        relative_change: `delta / |before|`, NaN when `before` is 0 or NaN.
        ci_low, ci_high: paired percentile bootstrap interval of `delta`.
    """

    before: float
    after: float
    delta: float
    relative_change: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_change(
    before: Sequence[PromptEstimates],
    after: Sequence[PromptEstimates],
    bootstrap: BootstrapConfig = BootstrapConfig(),
) -> dict[str, FigureChange]:
    """Compare two measurements of the same prompts with a paired bootstrap.

    Each resample draws one set of prompt indices and pools both sides over it, so
    the interval of a change reflects only how the prompts differ in their change.
    A figure that one side leaves undefined for a prompt (a running rate that no
    rollout reached, say) is left out on both sides, so each change compares the
    same prompts. Use it for two monitoring points of a run or for two models.

    Args:
        before, after (sequences of `PromptEstimates`): per prompt, the same prompts in
            the same order on both sides.
        bootstrap (`BootstrapConfig`, *optional*): resampling settings.

    Returns:
        `{figure: FigureChange}` for every figure both sides define, by the flat names
        of `PooledEstimates.figures()`, standard errors excepted. The interval of a
        figure that fewer than 2 prompts define on both sides is NaN, and so is every
        interval with fewer than 2 prompts or `samples = 0`.

    Raises:
        `ValueError`: the two sides have different numbers of prompts.
    """
    if len(before) != len(after) or not before:
        raise ValueError(
            f"a paired comparison needs the same prompts on both sides, got {len(before)} and {len(after)} prompts"
        )
    columns_before, columns_after = _paired_columns(prompt_columns(before), prompt_columns(after))
    point_before = pool_columns(columns_before)
    point_after = pool_columns(columns_after)
    names = [name for name in point_before if name in point_after and name not in NO_INTERVAL]

    intervals: dict[str, tuple[float, float]] = {}
    if bootstrap.samples > 0 and len(before) >= 2:
        indices = resample_indices(len(before), bootstrap)  # [B, P]
        replicates_before = pool_columns({name: column[indices] for name, column in columns_before.items()})
        replicates_after = pool_columns({name: column[indices] for name, column in columns_after.items()})
        deltas = {name: replicates_after[name] - replicates_before[name] for name in names}  # {name: [B]}
        intervals = percentile_intervals(deltas, bootstrap.confidence)
        # Both sides are blanked alike, so one side's support is the pair's.
        support = figure_support(columns_before)
        for name in names:
            if int(support[name]) < 2:
                intervals[name] = (math.nan, math.nan)

    changes = {}
    for name in names:
        value_before = float(point_before[name])
        value_after = float(point_after[name])
        delta = value_after - value_before
        relative = delta / abs(value_before) if value_before != 0 and math.isfinite(value_before) else math.nan
        low, high = intervals.get(name, (math.nan, math.nan))
        changes[name] = FigureChange(value_before, value_after, delta, relative, low, high)
    return changes


def _paired_columns(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Keep the columns both sides have, with NaN on both sides where either is NaN."""
    paired_before, paired_after = {}, {}
    for name in before.keys() & after.keys():
        both = torch.isfinite(before[name]) & torch.isfinite(after[name])
        paired_before[name] = torch.where(both, before[name], math.nan)
        paired_after[name] = torch.where(both, after[name], math.nan)
    return paired_before, paired_after
