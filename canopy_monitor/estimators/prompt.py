"""Per-prompt estimators of canopy entropy and of the length-rate relation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from .correlation import correlate
from .length_views import length_buckets, running_entropy_rates
from .rollout import RolloutStats

COMPLETED_REASON = "fewer than 2 rollouts ended before the length cap, so the completed-only figures are undefined"


@dataclass(frozen=True)
class PromptEstimates:
    """Estimates for one prompt from its `M` rollouts, in nats.

    Attributes:
        num_rollouts: `M`.
        ce_star: Rao-Blackwellised canopy entropy `mean_i S_i`.
        ce_star_se: its standard error `std_i(S_i) / sqrt(M)` (divisor `M - 1`).
        ce_star_mc: plain Monte Carlo canopy entropy `mean_i L_i`.
        ce_star_mc_se: its standard error `std_i(L_i) / sqrt(M)`.
        mc_variance_ratio: `var(L) / var(S)`, how much the Rao-Blackwellised estimator saves.
        mean_length: `E[N]`.
        entropy_rate: `R = mean_i r_i`.
        branching_factor: `exp(R)`.
        generation_perplexity: `exp(CE* / E[N])`.
        truncation_rate: share of rollouts cut by the length cap.
        rho_pearson, rho_spearman, rho_kendall: correlation of `N_i` and `r_i` (tau-b for Kendall).
        length_rate_covariance: `Cov(N, r)` with divisor `M - 1`.
        length_driven: `E[N] * E[r]`, the part of `CE*` that length alone would give.
        conveyance: `Cov(N, r)` with divisor `M`; `length_driven + conveyance == ce_star`.
        entropy_rate_short, entropy_rate_medium, entropy_rate_long: mean `r_i` of the
            shortest, middle and longest third of the rollouts (see `length_buckets`).
        mean_length_short, mean_length_medium, mean_length_long: mean `N_i` of those thirds.
        running_entropy_rate: `{t: rate}`, the mean of `(sum_{s <= t} h_s) / t` over the
            rollouts with `N_i >= t`; empty when no step entropies were given.
        running_active_share: `{t: share}` of the rollouts with `N_i >= t`.
        completed: the same estimates over the rollouts that ended before the cap, or
            `None` when fewer than 2 did (or when not requested).
        undefined: why any figure above is NaN, one sentence per cause.
    """

    num_rollouts: int
    ce_star: float
    ce_star_se: float
    ce_star_mc: float
    ce_star_mc_se: float
    mc_variance_ratio: float
    mean_length: float
    entropy_rate: float
    branching_factor: float
    generation_perplexity: float
    truncation_rate: float
    rho_pearson: float
    rho_spearman: float
    rho_kendall: float
    length_rate_covariance: float
    length_driven: float
    conveyance: float
    entropy_rate_short: float = math.nan
    entropy_rate_medium: float = math.nan
    entropy_rate_long: float = math.nan
    mean_length_short: float = math.nan
    mean_length_medium: float = math.nan
    mean_length_long: float = math.nan
    running_entropy_rate: dict[int, float] = field(default_factory=dict)
    running_active_share: dict[int, float] = field(default_factory=dict)
    completed: PromptEstimates | None = None
    undefined: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """Return the estimates as plain JSON types (running positions become string keys)."""
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in ("running_entropy_rate", "running_active_share"):
                value = {str(position): rate for position, rate in value.items()}
            elif item.name == "completed":
                value = value.to_dict() if value is not None else None
            elif item.name == "undefined":
                value = list(value)
            values[item.name] = value
        return values

    @classmethod
    def from_dict(cls, values: dict) -> PromptEstimates:
        """Rebuild estimates from `to_dict`'s output; `None` figures (JSON null) become NaN."""
        arguments = {}
        for item in fields(cls):
            if item.name not in values:
                continue
            value = values[item.name]
            if item.name in ("running_entropy_rate", "running_active_share"):
                value = {int(position): _float(rate) for position, rate in value.items()}
            elif item.name == "completed":
                value = cls.from_dict(value) if value is not None else None
            elif item.name == "undefined":
                value = tuple(value)
            elif item.name == "num_rollouts":
                value = int(value)
            else:
                value = _float(value)
            arguments[item.name] = value
        return cls(**arguments)


def _float(value) -> float:
    return math.nan if value is None else float(value)


def _standard_error(values: torch.Tensor) -> float:
    return float(values.std(unbiased=True) / math.sqrt(values.numel()))


def estimate_prompt(
    stats: RolloutStats,
    step_entropies: torch.Tensor | None = None,
    *,
    running_positions: Sequence[int] = (),
    completed_only: bool = True,
) -> PromptEstimates:
    """Compute every per-prompt estimator from the rollouts of one prompt.

    Args:
        stats (`RolloutStats` with `M >= 2` rollouts): per-rollout `N`, `S`, `L`, truncation.
        step_entropies (`torch.Tensor` of shape `[M, K]`, *optional*): `h_t` per position,
            needed for the running entropy rates.
        running_positions (sequence of `int`, *optional*): positions `t` of the running
            entropy rate; ignored without `step_entropies`.
        completed_only (`bool`, *optional*, defaults to `True`): also estimate over the
            rollouts that ended before the cap (`completed`).

    Returns:
        `PromptEstimates`. Undefined figures are NaN and their reasons are listed in
        `undefined`; this function does not raise for them.
    """
    num_rollouts = stats.num_rollouts
    if num_rollouts < 2:
        raise ValueError(f"estimate_prompt needs at least 2 rollouts, got {num_rollouts}")
    undefined: list[str] = []

    lengths = stats.lengths.to(torch.float64)  # [M]
    entropy_sums = stats.entropy_sums.to(torch.float64)  # [M]
    surprisal_sums = stats.surprisal_sums.to(torch.float64)  # [M]
    rates = stats.entropy_rates  # [M]

    ce_star = float(entropy_sums.mean())
    ce_star_mc = float(surprisal_sums.mean())
    mean_length = float(lengths.mean())
    entropy_rate = float(rates.mean())

    variance_s = float(entropy_sums.var(unbiased=True))
    variance_l = float(surprisal_sums.var(unbiased=True))
    if variance_s > 0:
        mc_variance_ratio = variance_l / variance_s
    else:
        mc_variance_ratio = float("nan")
        undefined.append("the step-entropy sum is the same for every rollout, so the variance ratio is undefined")

    correlation = correlate(lengths, rates, x_name="length", y_name="entropy rate")
    if correlation.reason is not None:
        undefined.append(f"length-rate correlation undefined: {correlation.reason}")

    # In-sample decomposition: mean(N * r) = mean(N) * mean(r) + Cov_M(N, r), where
    # N * r = S, so the two parts add up to ce_star exactly (up to rounding).
    length_driven = mean_length * entropy_rate
    conveyance = float(((lengths - lengths.mean()) * (rates - rates.mean())).mean())

    buckets = length_buckets(stats)
    if any(bucket.num_rollouts == 0 for bucket in buckets.values()):
        undefined.append("a length bucket is empty because there are fewer than 3 rollouts")

    running_rate: dict[int, float] = {}
    running_share: dict[int, float] = {}
    if step_entropies is not None:
        for position, running in running_entropy_rates(step_entropies, stats.lengths, running_positions).items():
            running_rate[position] = running.entropy_rate
            running_share[position] = running.active_share
            if math.isnan(running.entropy_rate):
                undefined.append(f"no rollout reached token {position}, so the running entropy rate there is NaN")

    completed = None
    if completed_only:
        finished = ~stats.truncated
        if int(finished.sum()) >= 2:
            completed = estimate_prompt(
                stats.subset(finished),
                step_entropies[finished] if step_entropies is not None else None,
                running_positions=running_positions,
                completed_only=False,
            )
        else:
            undefined.append(COMPLETED_REASON)

    return PromptEstimates(
        num_rollouts=num_rollouts,
        ce_star=ce_star,
        ce_star_se=_standard_error(entropy_sums),
        ce_star_mc=ce_star_mc,
        ce_star_mc_se=_standard_error(surprisal_sums),
        mc_variance_ratio=mc_variance_ratio,
        mean_length=mean_length,
        entropy_rate=entropy_rate,
        branching_factor=math.exp(entropy_rate),
        generation_perplexity=math.exp(ce_star / mean_length),
        truncation_rate=float(stats.truncated.to(torch.float64).mean()),
        rho_pearson=correlation.pearson,
        rho_spearman=correlation.spearman,
        rho_kendall=correlation.kendall,
        length_rate_covariance=correlation.covariance,
        length_driven=length_driven,
        conveyance=conveyance,
        entropy_rate_short=buckets["short"].entropy_rate,
        entropy_rate_medium=buckets["medium"].entropy_rate,
        entropy_rate_long=buckets["long"].entropy_rate,
        mean_length_short=buckets["short"].mean_length,
        mean_length_medium=buckets["medium"].mean_length,
        mean_length_long=buckets["long"].mean_length,
        running_entropy_rate=running_rate,
        running_active_share=running_share,
        completed=completed,
        undefined=tuple(undefined),
    )
