"""Association between two per-rollout series, and its pooling over prompts.

One routine computes every coefficient for one prompt; another pools them
across prompts. Inputs are 1-D tensors of equal length `[M]`. Arithmetic is done
in float64, so the results do not depend on the dtype of the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Pearson and Spearman coefficients of exactly +-1 have an infinite Fisher z; they
# are clipped to this magnitude before pooling.
_MAX_ABS_CORRELATION = 1.0 - 1e-12


@dataclass(frozen=True)
class Correlation:
    """Coefficients of association between two series of one prompt.

    `covariance` uses the unbiased divisor `n - 1`. A coefficient that is undefined
    is NaN, and `reason` gives the cause (`None` when every coefficient is defined).
    """

    n: int
    pearson: float
    spearman: float
    kendall: float
    covariance: float
    reason: str | None = None


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank `values` `[n]` from 1 to n, giving tied values the mean of their ranks."""
    values = values.to(torch.float64)
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)

    # Walk the runs of equal values in sorted order; each run gets its mean rank.
    start = 0
    n = values.numel()
    while start < n:
        end = start + 1
        while end < n and sorted_values[end] == sorted_values[start]:
            end += 1
        ranks[order[start:end]] = (start + end + 1) / 2.0
        start = end
    return ranks


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    dx = x - x.mean()
    dy = y - y.mean()
    denominator = torch.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denominator)


def _kendall_tau_b(x: torch.Tensor, y: torch.Tensor) -> float:
    # Pairwise signs over all i < j; ties contribute 0 to the numerator and are
    # removed from the matching factor of the denominator (tau-b).
    sign_x = torch.sign(x[:, None] - x[None, :])  # [n, n]
    sign_y = torch.sign(y[:, None] - y[None, :])  # [n, n]
    upper = torch.triu(torch.ones_like(sign_x, dtype=torch.bool), diagonal=1)
    numerator = (sign_x * sign_y)[upper].sum()
    denominator = torch.sqrt((sign_x * sign_x)[upper].sum() * (sign_y * sign_y)[upper].sum())
    return float(numerator / denominator)


def correlate(x: torch.Tensor, y: torch.Tensor, *, x_name: str = "x", y_name: str = "y") -> Correlation:
    """Compute Pearson, Spearman, Kendall tau-b and the covariance of `x` and `y`.

    Args:
        x (`torch.Tensor` of shape `[n]`): first series, e.g. rollout lengths `N_i`.
        y (`torch.Tensor` of shape `[n]`): second series, e.g. entropy rates `r_i`.
        x_name, y_name (`str`): names used in the reason of an undefined result.

    Returns:
        `Correlation`. With `n < 3`, or a constant series, the three coefficients are
        NaN and `reason` gives the cause, while the covariance is NaN only for `n < 2`.
    """
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"x and y must be 1-D tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.detach().to(torch.float64).cpu()
    y = y.detach().to(torch.float64).cpu()
    n = x.numel()
    nan = float("nan")

    covariance = float(((x - x.mean()) * (y - y.mean())).sum() / (n - 1)) if n >= 2 else nan
    if n < 3:
        return Correlation(n, nan, nan, nan, covariance, f"fewer than 3 rollouts ({n})")
    if bool((x == x[0]).all()):
        return Correlation(n, nan, nan, nan, covariance, f"{x_name} is the same for every rollout")
    if bool((y == y[0]).all()):
        return Correlation(n, nan, nan, nan, covariance, f"{y_name} is the same for every rollout")

    return Correlation(
        n=n,
        pearson=_pearson(x, y),
        spearman=_pearson(average_ranks(x), average_ranks(y)),
        kendall=_kendall_tau_b(x, y),
        covariance=covariance,
    )


def _weighted_mean(values: list[float], weights: list[float]) -> float:
    pairs = [(v, w) for v, w in zip(values, weights) if math.isfinite(v) and w > 0]
    total = sum(w for _, w in pairs)
    if total == 0:
        return float("nan")
    return sum(v * w for v, w in pairs) / total


def fisher_pool(coefficients: list[float], sizes: list[int]) -> float:
    """Pool correlation coefficients through Fisher's z with weights `n_p - 3`.

    NaN coefficients and prompts with `n_p <= 3` carry no weight; NaN when none is left.
    """
    z_values = [math.atanh(max(-_MAX_ABS_CORRELATION, min(_MAX_ABS_CORRELATION, r))) if math.isfinite(r) else r for r in coefficients]
    z_mean = _weighted_mean(z_values, [n - 3 for n in sizes])
    return math.tanh(z_mean) if math.isfinite(z_mean) else float("nan")


@dataclass(frozen=True)
class PooledCorrelation:
    """Within-prompt coefficients pooled over prompts (NaN when no prompt defines them)."""

    pearson: float
    spearman: float
    kendall: float
    covariance: float


def pool_correlations(correlations: list[Correlation]) -> PooledCorrelation:
    """Pool within-prompt coefficients over prompts.

    Pearson and Spearman go through Fisher's z with weights `n_p - 3`. Kendall is a
    weighted mean with weights `n_p (n_p - 1) / 2`, and the covariance a weighted mean
    with weights `n_p - 1`. Undefined (NaN) per-prompt values are left out.
    """
    sizes = [c.n for c in correlations]
    return PooledCorrelation(
        pearson=fisher_pool([c.pearson for c in correlations], sizes),
        spearman=fisher_pool([c.spearman for c in correlations], sizes),
        kendall=_weighted_mean([c.kendall for c in correlations], [n * (n - 1) / 2 for n in sizes]),
        covariance=_weighted_mean([c.covariance for c in correlations], [n - 1 for n in sizes]),
    )
