"""Per-prompt estimators of canopy entropy and of the length-rate relation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .correlation import correlate
from .rollout import RolloutStats


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
    undefined: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        values = asdict(self)
        values["undefined"] = list(self.undefined)
        return values


def _standard_error(values: torch.Tensor) -> float:
    return float(values.std(unbiased=True) / math.sqrt(values.numel()))


def estimate_prompt(stats: RolloutStats) -> PromptEstimates:
    """Compute every per-prompt estimator from the rollouts of one prompt.

    Args:
        stats (`RolloutStats` with `M >= 2` rollouts): per-rollout `N`, `S`, `L`, truncation.

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
        undefined=tuple(undefined),
    )
