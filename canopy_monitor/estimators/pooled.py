"""Pooling of per-prompt estimates over the held-out prompts."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

from .correlation import Correlation, pool_correlations
from .prompt import PromptEstimates


POOLED_CORRELATION_REASON = (
    "the pooled Pearson and Spearman correlations need at least 4 rollouts per prompt (Fisher weights M - 3)"
)


@dataclass(frozen=True)
class PooledEstimates:
    """Estimates pooled over `P` prompts, in nats.

    Linear figures (`ce_star`, `ce_star_mc`, `mean_length`, `entropy_rate`,
    `truncation_rate`, `length_driven`, `conveyance`) are unweighted means over
    prompts, so `length_driven + conveyance == ce_star` still holds.
    `branching_factor` and `generation_perplexity` apply `exp` after averaging.
    `ce_star_se` and `ce_star_mc_se` are the rollout-sampling error of the mean,
    `sqrt(sum_p se_p^2) / P`, with the prompts held fixed. `mc_variance_ratio` is the
    ratio of the mean within-prompt variances of `L` and `S`. Correlations are
    computed within prompts and pooled: Pearson (`rho_length_rate`) and Spearman
    through Fisher's z with weights `M - 3`, Kendall tau-b with weights
    `M (M - 1) / 2`, the covariance with weights `M - 1`. `total_rollouts` counts the
    rollouts of all prompts. `undefined` counts the prompts for each reason a
    per-prompt figure was NaN, and reports a pooled correlation left without weight.
    """

    num_prompts: int
    total_rollouts: int
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
    rho_length_rate: float
    rho_length_rate_spearman: float
    rho_length_rate_kendall: float
    length_rate_covariance: float
    length_driven: float
    conveyance: float
    undefined: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def scalars(self) -> dict[str, float]:
        """Return the numeric figures by field name, without `undefined`."""
        values = self.to_dict()
        values.pop("undefined")
        return values


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def pool_prompts(estimates: Sequence[PromptEstimates]) -> PooledEstimates:
    """Pool the estimates of several prompts as one monitoring point reports them.

    Args:
        estimates (sequence of `PromptEstimates`, at least one).
    """
    if not estimates:
        raise ValueError("pool_prompts needs the estimates of at least one prompt")
    num_prompts = len(estimates)

    ce_star = _mean([e.ce_star for e in estimates])
    mean_length = _mean([e.mean_length for e in estimates])
    entropy_rate = _mean([e.entropy_rate for e in estimates])

    # Within-prompt variances are recovered from the standard errors: var = se^2 * M.
    variance_s = math.fsum(e.ce_star_se**2 * e.num_rollouts for e in estimates)
    variance_l = math.fsum(e.ce_star_mc_se**2 * e.num_rollouts for e in estimates)
    mc_variance_ratio = variance_l / variance_s if variance_s > 0 else float("nan")

    correlations = pool_correlations(
        [
            Correlation(e.num_rollouts, e.rho_pearson, e.rho_spearman, e.rho_kendall, e.length_rate_covariance)
            for e in estimates
        ]
    )
    undefined = Counter(reason for e in estimates for reason in e.undefined)
    if all(e.num_rollouts <= 3 for e in estimates):
        undefined[POOLED_CORRELATION_REASON] = num_prompts

    return PooledEstimates(
        num_prompts=num_prompts,
        total_rollouts=sum(e.num_rollouts for e in estimates),
        ce_star=ce_star,
        ce_star_se=math.sqrt(math.fsum(e.ce_star_se**2 for e in estimates)) / num_prompts,
        ce_star_mc=_mean([e.ce_star_mc for e in estimates]),
        ce_star_mc_se=math.sqrt(math.fsum(e.ce_star_mc_se**2 for e in estimates)) / num_prompts,
        mc_variance_ratio=mc_variance_ratio,
        mean_length=mean_length,
        entropy_rate=entropy_rate,
        branching_factor=math.exp(entropy_rate),
        generation_perplexity=math.exp(ce_star / mean_length),
        truncation_rate=_mean([e.truncation_rate for e in estimates]),
        rho_length_rate=correlations.pearson,
        rho_length_rate_spearman=correlations.spearman,
        rho_length_rate_kendall=correlations.kendall,
        length_rate_covariance=correlations.covariance,
        length_driven=_mean([e.length_driven for e in estimates]),
        conveyance=_mean([e.conveyance for e in estimates]),
        undefined=dict(undefined),
    )
