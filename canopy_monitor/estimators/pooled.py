"""Pooling of per-prompt estimates over the held-out prompts.

The per-prompt estimates become columns `[P]` (one value per prompt), and one routine
pools columns of any leading shape `[..., P]`. The point estimate pools the columns as
they are. The bootstrap pools `B` resampled copies `[B, P]` with the same code, so an
interval always belongs to the figure it is reported beside.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from .bootstrap import BootstrapConfig, percentile_intervals, resample_indices
from .prompt import PromptEstimates

POOLED_CORRELATION_REASON = (
    "the pooled Pearson and Spearman correlations need at least 4 rollouts per prompt (Fisher weights M - 3)"
)
BOOTSTRAP_REASON = "bootstrap intervals need at least 2 prompts"
COMPLETED_CORRELATION_REASON = (
    "the pooled Pearson and Spearman correlations of completed rollouts need a prompt with at least 4 "
    "rollouts that ended before the cap"
)
THIN_SUPPORT_REASON = "a bootstrap interval is NaN where fewer than 2 prompts define its figure"
NO_COMPLETED_REASON = "no prompt has 2 rollouts that ended before the length cap, so every completed-only figure is NaN"
COMPLETED_PREFIX = "completed/"
# Prefix of the reasons of completed-only figures when they are reported with the others.
COMPLETED_REASON_PREFIX = "completed-only figures: "

# Pearson and Spearman coefficients of exactly +-1 have an infinite Fisher z; they
# are clipped to this magnitude before pooling.
_MAX_ABS_CORRELATION = 1.0 - 1e-12

# Figures that are unweighted means over the prompts that define them.
_MEAN_FIGURES = (
    "ce_star",
    "ce_star_mc",
    "mean_length",
    "entropy_rate",
    "truncation_rate",
    "length_driven",
    "conveyance",
    "entropy_rate_short",
    "entropy_rate_medium",
    "entropy_rate_long",
    "mean_length_short",
    "mean_length_medium",
    "mean_length_long",
)
_RUNNING_RATE = "running_entropy_rate_"
_RUNNING_SHARE = "running_active_share_"

# Standard errors describe rollout sampling with the prompts fixed; a bootstrap
# interval of a standard error would mean little, so they get none. Completed
# rollouts have a truncation rate of 0 by definition.
NO_INTERVAL = ("ce_star_se", "ce_star_mc_se", "completed/ce_star_se", "completed/ce_star_mc_se", "completed/truncation_rate")


@dataclass(frozen=True)
class PooledEstimates:
    """Estimates pooled over `P` prompts, in nats.

    Linear figures (`ce_star`, `ce_star_mc`, `mean_length`, `entropy_rate`,
    `truncation_rate`, `length_driven`, `conveyance`, the length-bucket figures) are
    unweighted means over prompts, so `length_driven + conveyance == ce_star` still
    holds. `branching_factor` and `generation_perplexity` apply `exp` after averaging.
    `ce_star_se` and `ce_star_mc_se` are the rollout-sampling error of the mean,
    `sqrt(sum_p se_p^2) / P`, with the prompts held fixed. `mc_variance_ratio` is the
    ratio of the summed within-prompt variances of `L` and `S`. Correlations are
    computed within prompts and pooled: Pearson (`rho_length_rate`) and Spearman
    through Fisher's z with weights `M - 3`, Kendall tau-b with weights
    `M (M - 1) / 2`, the covariance with weights `M - 1`.

    Attributes:
        num_prompts: prompts pooled (for `completed`, those with 2 or more completed rollouts).
        total_rollouts: rollouts of all pooled prompts.
        running_entropy_rate: `{t: rate}`, the mean over prompts of their running
            entropy rate at `t`, over the prompts where some rollout reached `t`.
        running_active_share: `{t: share}`, the mean over prompts of the share of
            rollouts that reached `t`.
        completed: the same figures over the rollouts that ended before the cap, pooled
            over the prompts with 2 or more of them (NaN figures when there is none).
            `None` only inside a `completed` itself.
        intervals: `{figure: (low, high)}`, percentile bootstrap intervals over prompts,
            keyed by the names of `figures()` (completed-only ones included); empty
            without a bootstrap.
        confidence: coverage of the intervals, e.g. `0.95`; `None` without a bootstrap.
        bootstrap_samples: resamples behind the intervals (0 without a bootstrap).
        undefined: `{reason: prompts}`, how many prompts had a NaN figure for each
            reason, plus the reasons a pooled figure or interval is NaN. Reasons that
            only `completed` has appear here too, prefixed with `completed-only figures: `.
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
    entropy_rate_short: float
    entropy_rate_medium: float
    entropy_rate_long: float
    mean_length_short: float
    mean_length_medium: float
    mean_length_long: float
    running_entropy_rate: dict[int, float] = field(default_factory=dict)
    running_active_share: dict[int, float] = field(default_factory=dict)
    completed: PooledEstimates | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    confidence: float | None = None
    bootstrap_samples: int = 0
    undefined: dict[str, int] = field(default_factory=dict)

    def figures(self) -> dict[str, float]:
        """Return every estimated figure by a flat name.

        Running figures are named `running_entropy_rate_<t>` and
        `running_active_share_<t>`, completed-only figures `completed/<name>`. The counts
        `num_prompts` and `total_rollouts` are not figures and are left out.
        """
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float):
                values[item.name] = value
        for position, rate in self.running_entropy_rate.items():
            values[f"{_RUNNING_RATE}{position}"] = rate
        for position, share in self.running_active_share.items():
            values[f"{_RUNNING_SHARE}{position}"] = share
        values.pop("confidence", None)
        if self.completed is not None:
            completed = self.completed.figures()
            # Every completed rollout ended before the cap.
            completed.pop("truncation_rate")
            values.update({COMPLETED_PREFIX + name: value for name, value in completed.items()})
        return values

    def to_dict(self) -> dict:
        """Return the estimates as plain JSON types, nested like the attributes."""
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in ("running_entropy_rate", "running_active_share"):
                value = {str(position): figure for position, figure in value.items()}
            elif item.name == "completed":
                value = value.to_dict() if value is not None else None
            elif item.name == "intervals":
                value = {name: list(bounds) for name, bounds in value.items()}
            elif item.name == "undefined":
                value = dict(value)
            values[item.name] = value
        return values


def pool_prompts(
    estimates: Sequence[PromptEstimates], bootstrap: BootstrapConfig | None = None
) -> PooledEstimates:
    """Pool the estimates of several prompts as one monitoring point reports them.

    Args:
        estimates (sequence of `PromptEstimates`, at least one).
        bootstrap (`BootstrapConfig`, *optional*): resample the prompts to give each
            figure a percentile interval. Without it there are no intervals.
    """
    if not estimates:
        raise ValueError("pool_prompts needs the estimates of at least one prompt")
    columns = prompt_columns(estimates)
    figures = {name: float(value) for name, value in pool_columns(columns).items()}

    undefined = Counter(reason for e in estimates for reason in e.undefined)
    intervals: dict[str, tuple[float, float]] = {}
    if bootstrap is not None and bootstrap.samples > 0:
        if len(estimates) < 2:
            undefined[BOOTSTRAP_REASON] = len(estimates)
        else:
            intervals = bootstrap_intervals(columns, bootstrap)
            if any(math.isnan(low) for low, _ in intervals.values()):
                undefined[THIN_SUPPORT_REASON] = len(estimates)

    completed_estimates = [e.completed for e in estimates if e.completed is not None]
    completed_undefined = Counter(reason for e in completed_estimates for reason in e.undefined)
    if not completed_estimates:
        completed_undefined[NO_COMPLETED_REASON] = len(estimates)
    completed = _assemble(
        {name[len(COMPLETED_PREFIX) :]: value for name, value in figures.items() if name.startswith(COMPLETED_PREFIX)},
        completed_estimates,
        intervals={
            name[len(COMPLETED_PREFIX) :]: bounds
            for name, bounds in intervals.items()
            if name.startswith(COMPLETED_PREFIX)
        },
        bootstrap=bootstrap,
        undefined=completed_undefined,
        correlation_reason=COMPLETED_CORRELATION_REASON,
    )
    for reason, count in completed.undefined.items():
        # A cause already reported for all rollouts is not repeated for the completed
        # ones. Neither is a running position that completed rollouts rarely reach
        # (they end before the cap), nor the lack of completed prompts, which each
        # prompt's own reason already reports.
        if reason in undefined or reason == NO_COMPLETED_REASON or reason.startswith("no rollout reached token"):
            continue
        undefined[COMPLETED_REASON_PREFIX + reason] = count
    return _assemble(
        {name: value for name, value in figures.items() if not name.startswith(COMPLETED_PREFIX)},
        estimates,
        intervals=intervals,
        bootstrap=bootstrap,
        undefined=undefined,
        completed=completed,
    )


def _assemble(
    figures: dict[str, float],
    estimates: Sequence[PromptEstimates],
    *,
    intervals: dict[str, tuple[float, float]],
    bootstrap: BootstrapConfig | None,
    undefined: Counter,
    completed: PooledEstimates | None = None,
    correlation_reason: str = POOLED_CORRELATION_REASON,
) -> PooledEstimates:
    if estimates and all(e.num_rollouts <= 3 for e in estimates):
        undefined[correlation_reason] = len(estimates)
    running_rate = {}
    running_share = {}
    for name, value in figures.items():
        if name.startswith(_RUNNING_RATE):
            running_rate[int(name[len(_RUNNING_RATE) :])] = value
        elif name.startswith(_RUNNING_SHARE):
            running_share[int(name[len(_RUNNING_SHARE) :])] = value
    scalar_names = {item.name for item in fields(PooledEstimates)} - {"num_prompts", "total_rollouts"}
    with_intervals = bootstrap is not None and bootstrap.samples > 0 and bool(intervals)
    return PooledEstimates(
        num_prompts=len(estimates),
        total_rollouts=sum(e.num_rollouts for e in estimates),
        **{name: value for name, value in figures.items() if name in scalar_names},
        running_entropy_rate=running_rate,
        running_active_share=running_share,
        completed=completed,
        intervals=intervals,
        confidence=bootstrap.confidence if with_intervals else None,
        bootstrap_samples=bootstrap.samples if with_intervals else 0,
        undefined=dict(undefined),
    )


# Columns and their pooling


def prompt_columns(estimates: Sequence[PromptEstimates]) -> dict[str, torch.Tensor]:
    """Arrange per-prompt estimates as columns `{name: [P]}` (float64), for pooling.

    Completed-only estimates get the same columns under `completed/`; a prompt
    without them has `n = 0` and NaN there. Both groups have a column for every
    running position of any prompt, so the figures' names never depend on which
    rollouts ended.
    """
    positions = sorted({position for e in estimates for position in e.running_entropy_rate})
    columns = _group_columns(list(estimates), positions)
    completed = _group_columns([e.completed for e in estimates], positions)
    columns.update({COMPLETED_PREFIX + name: column for name, column in completed.items()})
    return columns


def _group_columns(estimates: list[PromptEstimates | None], positions: list[int]) -> dict[str, torch.Tensor]:
    nan = math.nan

    def column(read) -> torch.Tensor:
        return torch.tensor([read(e) if e is not None else nan for e in estimates], dtype=torch.float64)

    columns = {
        "n": torch.tensor([e.num_rollouts if e is not None else 0 for e in estimates], dtype=torch.float64),
        "ce_star_se": column(lambda e: e.ce_star_se),
        "ce_star_mc_se": column(lambda e: e.ce_star_mc_se),
        "rho_pearson": column(lambda e: e.rho_pearson),
        "rho_spearman": column(lambda e: e.rho_spearman),
        "rho_kendall": column(lambda e: e.rho_kendall),
        "length_rate_covariance": column(lambda e: e.length_rate_covariance),
    }
    for name in _MEAN_FIGURES:
        columns[name] = column(lambda e, name=name: getattr(e, name))
    for position in positions:
        columns[f"{_RUNNING_RATE}{position}"] = column(lambda e: e.running_entropy_rate.get(position, nan))
        columns[f"{_RUNNING_SHARE}{position}"] = column(lambda e: e.running_active_share.get(position, nan))
    return columns


def pool_columns(columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pool columns `{name: [..., P]}` from `prompt_columns` over their last dimension.

    Returns:
        `{figure: [...]}` with the flat names of `PooledEstimates.figures()`, and
        `completed/truncation_rate`, which is 0 by definition.
    """
    figures = _pool_group({name: c for name, c in columns.items() if not name.startswith(COMPLETED_PREFIX)})
    completed = {name[len(COMPLETED_PREFIX) :]: c for name, c in columns.items() if name.startswith(COMPLETED_PREFIX)}
    if completed:
        figures.update({COMPLETED_PREFIX + name: value for name, value in _pool_group(completed).items()})
    return figures


def _nan_mean(values: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(values)
    return torch.where(finite, values, 0.0).sum(dim=-1) / finite.sum(dim=-1)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    usable = torch.isfinite(values) & (weights > 0)
    weights = torch.where(usable, weights, 0.0)
    return (torch.where(usable, values, 0.0) * weights).sum(dim=-1) / weights.sum(dim=-1)


def _fisher_mean(coefficients: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    clipped = coefficients.clamp(-_MAX_ABS_CORRELATION, _MAX_ABS_CORRELATION)
    return torch.tanh(_weighted_mean(torch.atanh(clipped), sizes - 3))


def mean_over_prompts(values: torch.Tensor) -> torch.Tensor:
    """Average a column `[..., P]` over its finite values, as the linear figures are pooled."""
    return _nan_mean(values)


def fisher_mean_over_prompts(coefficients: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Pool correlation columns `[..., P]` through Fisher's z with weights `n_p - 3`, as `rho_length_rate` is."""
    return _fisher_mean(coefficients, sizes)


def _pool_group(columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sizes = columns["n"]  # [..., P]
    # A paired comparison blanks a prompt's figures where the other side lacks them.
    defined = (sizes > 0) & torch.isfinite(columns["ce_star"])
    num_defined = defined.sum(dim=-1)

    figures = {name: _nan_mean(columns[name]) for name in _MEAN_FIGURES}
    standard_error = columns["ce_star_se"]
    standard_error_mc = columns["ce_star_mc_se"]
    figures["ce_star_se"] = torch.where(defined, standard_error**2, 0.0).sum(dim=-1).sqrt() / num_defined
    figures["ce_star_mc_se"] = torch.where(defined, standard_error_mc**2, 0.0).sum(dim=-1).sqrt() / num_defined

    # Within-prompt variances are recovered from the standard errors: var = se^2 * M.
    variance_s = torch.where(defined, standard_error**2 * sizes, 0.0).sum(dim=-1)
    variance_l = torch.where(defined, standard_error_mc**2 * sizes, 0.0).sum(dim=-1)
    figures["mc_variance_ratio"] = torch.where(variance_s > 0, variance_l / variance_s, math.nan)

    figures["branching_factor"] = torch.exp(figures["entropy_rate"])
    figures["generation_perplexity"] = torch.exp(figures["ce_star"] / figures["mean_length"])
    figures["rho_length_rate"] = _fisher_mean(columns["rho_pearson"], sizes)
    figures["rho_length_rate_spearman"] = _fisher_mean(columns["rho_spearman"], sizes)
    figures["rho_length_rate_kendall"] = _weighted_mean(columns["rho_kendall"], sizes * (sizes - 1) / 2)
    figures["length_rate_covariance"] = _weighted_mean(columns["length_rate_covariance"], sizes - 1)

    for name, column in columns.items():
        if name.startswith((_RUNNING_RATE, _RUNNING_SHARE)):
            figures[name] = _nan_mean(column)
    return figures


def bootstrap_intervals(
    columns: dict[str, torch.Tensor], bootstrap: BootstrapConfig
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over prompts for every pooled figure.

    Prompts are resampled with replacement, each keeping all its rollouts, and the
    resampled columns are pooled exactly as the point estimate is. Standard errors
    get no interval. A figure that fewer than 2 prompts define gets `(nan, nan)`:
    every resample would repeat the one prompt, and an interval of zero width would
    look like certainty.
    """
    num_prompts = next(iter(columns.values())).shape[-1]
    indices = resample_indices(num_prompts, bootstrap)  # [B, P]
    replicates = pool_columns({name: column[indices] for name, column in columns.items()})  # {name: [B]}
    support = figure_support(columns)
    intervals = {}
    for name, bounds in percentile_intervals(replicates, bootstrap.confidence).items():
        if name in NO_INTERVAL:
            continue
        intervals[name] = bounds if int(support[name]) >= 2 else (math.nan, math.nan)
    return intervals


def figure_support(columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Count the prompts that contribute to each pooled figure of `pool_columns`.

    Returns:
        `{figure: [...]}` (int64), with the names and leading shape of `pool_columns`.
    """
    support = _group_support({name: c for name, c in columns.items() if not name.startswith(COMPLETED_PREFIX)})
    completed = {name[len(COMPLETED_PREFIX) :]: c for name, c in columns.items() if name.startswith(COMPLETED_PREFIX)}
    if completed:
        support.update({COMPLETED_PREFIX + name: count for name, count in _group_support(completed).items()})
    return support


def _group_support(columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Mirrors `_pool_group`: a prompt counts where it carries weight in the figure.
    sizes = columns["n"]
    defined = (sizes > 0) & torch.isfinite(columns["ce_star"])

    def finite(name: str, weighted: torch.Tensor | None = None) -> torch.Tensor:
        usable = torch.isfinite(columns[name])
        if weighted is not None:
            usable &= weighted
        return usable.sum(dim=-1)

    support = {name: finite(name) for name in _MEAN_FIGURES}
    for name in ("ce_star_se", "ce_star_mc_se", "mc_variance_ratio"):
        support[name] = defined.sum(dim=-1)
    support["branching_factor"] = support["entropy_rate"]
    support["generation_perplexity"] = support["ce_star"]
    support["rho_length_rate"] = finite("rho_pearson", sizes > 3)
    support["rho_length_rate_spearman"] = finite("rho_spearman", sizes > 3)
    support["rho_length_rate_kendall"] = finite("rho_kendall", sizes > 1)
    support["length_rate_covariance"] = finite("length_rate_covariance", sizes > 1)
    for name in columns:
        if name.startswith((_RUNNING_RATE, _RUNNING_SHARE)):
            support[name] = finite(name)
    return support
