"""Change of the pooled figures between two measurements of the same prompts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .bootstrap import BootstrapConfig, percentile_intervals, resample_indices
from .pooled import NO_INTERVAL, figure_support, pool_columns, prompt_columns
from .prompt import PromptEstimates
from .semantic import SemanticPromptEstimates, pool_semantic_columns, semantic_columns, semantic_support


@dataclass(frozen=True)
class FigureChange:
    """One pooled figure at two measurements and its change.

    Attributes:
        before, after: the pooled figure of each side.
        delta: `after - before`.
        relative_change: `delta / |before|`, NaN when `before` is 0 or NaN.
        ci_low, ci_high: paired percentile bootstrap interval of `delta`.
        relative_ci_low, relative_ci_high: paired percentile bootstrap interval of
            `relative_change`, from the same resamples as the interval of `delta`.
    """

    before: float
    after: float
    delta: float
    relative_change: float
    ci_low: float
    ci_high: float
    relative_ci_low: float = math.nan
    relative_ci_high: float = math.nan

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
        of `PooledEstimates.figures()`, standard errors excepted. The intervals of a
        figure that fewer than 2 prompts define on both sides are NaN, and so is every
        interval with fewer than 2 prompts or `samples = 0`.

    Raises:
        `ValueError`: the two sides have different numbers of prompts.
    """
    _check_pairs(before, after)
    columns_before, columns_after = _paired_columns(prompt_columns(before), prompt_columns(after))
    point_before = pool_columns(columns_before)
    point_after = pool_columns(columns_after)
    names = [name for name in point_before if name in point_after and name not in NO_INTERVAL]
    # Both sides are blanked alike, so one side's support is the pair's.
    support = {name: int(count) for name, count in figure_support(columns_before).items()}
    return _figure_changes(
        names, point_before, point_after, columns_before, columns_after, pool_columns, support, bootstrap
    )


def paired_semantic_change(
    before: Sequence[SemanticPromptEstimates],
    after: Sequence[SemanticPromptEstimates],
    *,
    before_estimates: Sequence[PromptEstimates],
    after_estimates: Sequence[PromptEstimates],
    prompt_sets: Sequence[str] | None = None,
    bootstrap: BootstrapConfig = BootstrapConfig(),
) -> dict[str, FigureChange]:
    """Compare the semantic figures of two measurements of the same prompts with a paired bootstrap.

    Resampling and pairing work as in `paired_change`, with the same prompt indices
    for the same `bootstrap`. The across-prompt slope of diversity on entropy rate
    uses each side's own mean entropy rates and lengths, with the prompt sets as
    controls.

    Args:
        before, after (sequences of `SemanticPromptEstimates`): per prompt, the same
            prompts in the same order on both sides.
        before_estimates, after_estimates (sequences of `PromptEstimates`): the same
            prompts' other estimates on each side, for the slope's entropy rate and
            length (in nats).
        prompt_sets (sequence of `str`, *optional*): the set each prompt comes from;
            by default all prompts form one set.
        bootstrap (`BootstrapConfig`, *optional*): resampling settings.

    Returns:
        `{figure: FigureChange}` by the names of `PooledSemantic.figures()`.

    Raises:
        `ValueError`: the sides, or a side and its estimates, differ in their number of prompts.
    """
    _check_pairs(before, after)
    if len(before_estimates) != len(before) or len(after_estimates) != len(after):
        raise ValueError(
            f"each side needs one PromptEstimates per semantic estimate, got {len(before_estimates)} and "
            f"{len(after_estimates)} for {len(before)} prompts"
        )
    sets = list(prompt_sets) if prompt_sets is not None else [""] * len(before)
    if len(sets) != len(before):
        raise ValueError(f"prompt_sets needs one name per prompt ({len(before)}), got {len(sets)}")
    names = list(dict.fromkeys(sets))
    codes = [names.index(name) for name in sets]

    def columns(semantic, estimates):
        rates = [e.entropy_rate for e in estimates]
        lengths = [e.mean_length for e in estimates]
        return semantic_columns(semantic, rates, lengths, codes)

    columns_before, columns_after = _paired_columns(columns(before, before_estimates), columns(after, after_estimates))
    point_before = pool_semantic_columns(columns_before)
    point_after = pool_semantic_columns(columns_after)
    # The slope is defined by each side's own values, so the pair's support is the smaller one.
    support_before = semantic_support(columns_before)
    support_after = semantic_support(columns_after)
    support = {name: min(support_before[name], support_after[name]) for name in support_before}
    return _figure_changes(
        list(point_before),
        point_before,
        point_after,
        columns_before,
        columns_after,
        pool_semantic_columns,
        support,
        bootstrap,
    )


def _check_pairs(before: Sequence, after: Sequence) -> None:
    if len(before) != len(after) or not before:
        raise ValueError(
            f"a paired comparison needs the same prompts on both sides, got {len(before)} and {len(after)} prompts"
        )


def _figure_changes(
    names: list[str],
    point_before: dict[str, torch.Tensor],
    point_after: dict[str, torch.Tensor],
    columns_before: dict[str, torch.Tensor],
    columns_after: dict[str, torch.Tensor],
    pool,
    support: dict[str, int],
    bootstrap: BootstrapConfig,
) -> dict[str, FigureChange]:
    """Build each figure's change, with paired intervals of the difference and of the relative change.

    `pool` turns columns `{name: [..., P]}` into figures `{name: [...]}`. It is applied to
    both sides' columns, resampled with one set of prompt indices.
    """
    num_prompts = next(iter(columns_before.values())).shape[-1]
    intervals: dict[str, tuple[float, float]] = {}
    relative_intervals: dict[str, tuple[float, float]] = {}
    if bootstrap.samples > 0 and num_prompts >= 2:
        indices = resample_indices(num_prompts, bootstrap)  # [B, P]
        replicates_before = pool({name: column[indices] for name, column in columns_before.items()})  # {name: [B]}
        replicates_after = pool({name: column[indices] for name, column in columns_after.items()})
        deltas = {name: replicates_after[name] - replicates_before[name] for name in names}
        relatives = {name: _relative(deltas[name], replicates_before[name]) for name in names}
        intervals = percentile_intervals(deltas, bootstrap.confidence)
        relative_intervals = percentile_intervals(relatives, bootstrap.confidence)
        for name in names:
            # A resample with a base of 0 and a nonzero delta has an infinite relative
            # change. Leaving it out would describe only the other resamples, so the
            # relative interval is undefined instead.
            if bool(((replicates_before[name] == 0) & (deltas[name] != 0)).any()):
                relative_intervals[name] = (math.nan, math.nan)

    nan_pair = (math.nan, math.nan)
    changes = {}
    for name in names:
        value_before = float(point_before[name])
        value_after = float(point_after[name])
        delta = value_after - value_before
        relative = delta / abs(value_before) if value_before != 0 and math.isfinite(value_before) else math.nan
        thin = support.get(name, 0) < 2
        low, high = nan_pair if thin else intervals.get(name, nan_pair)
        relative_low, relative_high = nan_pair if thin or math.isnan(relative) else relative_intervals.get(name, nan_pair)
        changes[name] = FigureChange(value_before, value_after, delta, relative, low, high, relative_low, relative_high)
    return changes


def _relative(delta: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Return `delta / |before|`, NaN where `before` is 0 (a replicate `percentile_intervals` then leaves out)."""
    return torch.where(before != 0, delta / before.abs(), math.nan)


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
