"""Semantic diversity of one prompt's rollouts, and its pooling over prompts.

Each rollout text is embedded as an L2-normalised vector `e_i` `[D]`. The embeddings
of one prompt's `M` rollouts form `E` `[M, D]`, and `K = E E^T` `[M, M]` contains their
cosine similarities. This module is pure maths on those tensors: embedding the texts
is `canopy_monitor.semantic`'s job.

Per prompt: rollout diversity `d_i = 1 - mean_{j != i} <e_i, e_j>`, prompt diversity
`mean_i d_i`, the Vendi score `exp(-sum lambda log lambda)` over the eigenvalues of
`K / M`, the mean `d_i` of each length third, and the within-prompt correlations
`rho(N, d)`, `rho(r, d)` and the partial correlation of `r` and `d` given `N`.
Over prompts: means, correlations pooled through Fisher's z with weights `M - 3`,
and the ordinary-least-squares slope of prompt diversity on mean entropy rate with
mean length and prompt-set dummies as controls.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from .bootstrap import BootstrapConfig, percentile_intervals, resample_indices
from .correlation import correlate
from .length_views import BUCKET_NAMES
from .pooled import BOOTSTRAP_REASON, THIN_SUPPORT_REASON, fisher_mean_over_prompts, mean_over_prompts

UNUSABLE_EMBEDDING_REASON = (
    "a rollout's embedding is not a finite nonzero vector, so that rollout is left out of the semantic figures"
)
DIVERSITY_REASON = "fewer than 2 rollouts have an embedding, so semantic diversity is undefined"
VENDI_REASON = "no rollout has an embedding, so the Vendi score is undefined"
DIVERSITY_BUCKET_REASON = "a length bucket of semantic diversity is empty because fewer than 3 rollouts have an embedding"
PARTIAL_SIZE_REASON = (
    "the partial correlation of entropy rate and diversity given length needs at least 4 rollouts with an embedding"
)
POOLED_SEMANTIC_CORRELATION_REASON = (
    "the pooled semantic correlations need at least 4 rollouts with an embedding per prompt (Fisher weights M - 3)"
)

# Embeddings come in float32, and one text embedded in two batches of different
# padding differs by about 1e-7 (all-MiniLM-L6-v2, sentence-transformers 6.3), so
# rollout diversities that all lie within this range are treated as equal.
_DIVERSITY_RESOLUTION = 1e-6
# Residuals smaller than this share of the centred series count as zero: the series is
# then a linear function of the control, up to rounding.
_RESIDUAL_TOLERANCE = 1e-10
# Singular values of the scaled regression design below this share of the largest
# count as zero when the rank of the design is decided.
_RANK_TOLERANCE = 1e-10

# Figures that are unweighted means over the prompts that define them.
_MEAN_FIGURES = ("diversity", "vendi_score", "diversity_short", "diversity_medium", "diversity_long")
# Pooled correlation figure -> per-prompt coefficient column, pooled through Fisher's z.
_CORRELATION_FIGURES = {
    "rho_length_diversity": "rho_length_diversity",
    "rho_length_diversity_spearman": "rho_length_diversity_spearman",
    "rho_rate_diversity": "rho_rate_diversity",
    "rho_rate_diversity_spearman": "rho_rate_diversity_spearman",
    "rho_rate_diversity_given_length": "rho_rate_diversity_given_length",
}
SLOPE_FIGURE = "diversity_rate_slope"


# Per-rollout and per-prompt figures


def usable_embeddings(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalise the rows of `embeddings` `[M, D]` in float64 and flag the usable ones.

    Returns:
        `(unit, usable)`: `unit` `[M, D]` with unit rows (unusable rows are 0), and
        `usable` `[M]` (bool), false for a row that has a non-finite entry or is zero.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must have shape [M, D], got {tuple(embeddings.shape)}")
    values = embeddings.detach().to(torch.float64).cpu()
    norms = values.norm(dim=1)  # [M]
    usable = torch.isfinite(values).all(dim=1) & torch.isfinite(norms) & (norms > 0)
    unit = torch.where(usable[:, None], values / torch.where(usable, norms, 1.0)[:, None], 0.0)
    return unit, usable


def rollout_diversity(unit: torch.Tensor) -> torch.Tensor:
    """Compute `d_i = 1 - mean_{j != i} <e_i, e_j>` for unit rows `unit` `[M, D]`.

    It is computed as `mean_{j != i} |e_i - e_j|^2 / 2`, equal for unit rows, because
    the distance form is exactly 0 for identical rows where `1 - <e_i, e_j>` leaves
    rounding residue.

    Returns:
        `[M]` float64 values in `[0, 2]` (clipped there against rounding), all NaN when
        `M < 2`, since a lone rollout has nothing to differ from.
    """
    num_rollouts = unit.shape[0]
    if num_rollouts < 2:
        return torch.full((num_rollouts,), math.nan, dtype=torch.float64)
    # The matrix-product form of `cdist` would bring back the rounding residue.
    distances = torch.cdist(unit[None], unit[None], compute_mode="donot_use_mm_for_euclid_dist")[0]  # [M, M]
    return (distances.square().sum(dim=1) / (2 * (num_rollouts - 1))).clamp(0.0, 2.0)


def vendi_score(unit: torch.Tensor) -> float:
    """Compute the Vendi score `exp(-sum_k lambda_k log lambda_k)` of unit rows `unit` `[M, D]`.

    `lambda_k` are the eigenvalues of `K / M` with `K = E E^T`, clipped at 0 against
    rounding, and `0 log 0 = 0`. With unit rows they sum to 1, so the score is the
    effective number of distinct rollouts: 1 when all are identical, `M` when they are
    orthogonal. It is clipped to `[1, M]` against rounding. NaN for `M = 0`.
    """
    num_rollouts = unit.shape[0]
    if num_rollouts == 0:
        return math.nan
    eigenvalues = torch.linalg.eigvalsh(unit @ unit.T / num_rollouts).clamp(min=0.0)  # [M]
    positive = eigenvalues[eigenvalues > 0]
    entropy = float(-(positive * positive.log()).sum())
    return min(max(math.exp(entropy), 1.0), float(num_rollouts))


def length_bucket_members(lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the indices `[count]` of the short, medium and long thirds of rollouts of lengths `[M]`.

    The split is that of `length_buckets`: rollouts ranked by `N_i` with ties kept in
    sampling order, and bucket `k` takes ranks `round(k M / 3)` up to `round((k + 1) M / 3)`.
    """
    num_rollouts = lengths.numel()
    order = torch.argsort(lengths, stable=True)  # [M]
    bounds = [round(k * num_rollouts / 3) for k in range(4)]
    return {name: order[bounds[index] : bounds[index + 1]] for index, name in enumerate(BUCKET_NAMES)}


def partial_correlation(
    x: torch.Tensor, y: torch.Tensor, control: torch.Tensor, *, x_name: str = "x", y_name: str = "y"
) -> tuple[float, str | None]:
    """Compute the Pearson partial correlation of `x` and `y` given `control` (all `[n]`).

    Both series are regressed on `control` with an intercept, and the residuals are
    correlated. When `control` is constant the residuals are the centred series, so the
    result is the plain Pearson correlation. This equals
    `(r_xy - r_xc r_yc) / sqrt((1 - r_xc^2) (1 - r_yc^2))` where the right side is defined.

    Returns:
        `(coefficient, reason)`. The coefficient is NaN, and `reason` gives the cause, in
        three cases: `n < 4`, a value that is not finite, and a series that is a linear
        function of `control`. With 3 points the residuals span one dimension, so the
        result would always be +-1.
    """
    n = x.numel()
    if n < 4:
        return math.nan, f"fewer than 4 rollouts ({n})"
    x = x.detach().to(torch.float64).cpu()
    y = y.detach().to(torch.float64).cpu()
    control = control.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(x).all() and torch.isfinite(y).all() and torch.isfinite(control).all()):
        return math.nan, "a value is NaN or infinite"

    control_centred = control - control.mean()  # [n]
    scale = float(control_centred @ control_centred)
    residuals = []
    for series, name in ((x, x_name), (y, y_name)):
        centred = series - series.mean()
        residual = centred - (float(centred @ control_centred) / scale) * control_centred if scale > 0 else centred
        if float(residual.norm()) <= _RESIDUAL_TOLERANCE * max(float(centred.norm()), float(series.abs().max())):
            return math.nan, f"{name} is the same for every rollout once length is accounted for"
        residuals.append(residual)
    x_residual, y_residual = residuals
    coefficient = float(x_residual @ y_residual / (x_residual.norm() * y_residual.norm()))
    return max(-1.0, min(1.0, coefficient)), None


@dataclass(frozen=True)
class SemanticPromptEstimates:
    """Semantic figures of one prompt from the embeddings of its `M` rollouts.

    Attributes:
        num_rollouts: rollouts with a usable embedding (`M` unless an embedding was not
            a finite nonzero vector).
        rollout_diversity: `d_i` of every rollout in sampling order, NaN for a rollout
            without a usable embedding and when fewer than 2 have one.
        diversity: prompt diversity `mean_i d_i`.
        vendi_score: effective number of distinct rollouts, from 1 to `num_rollouts`.
        diversity_short, diversity_medium, diversity_long: mean `d_i` of the shortest,
            middle and longest third of the rollouts (see `length_bucket_members`).
        rho_length_diversity, rho_length_diversity_spearman: Pearson and Spearman
            correlation of `N_i` and `d_i`.
        rho_rate_diversity, rho_rate_diversity_spearman: the same for `r_i` and `d_i`.
        rho_rate_diversity_given_length: Pearson partial correlation of `r_i` and `d_i`
            given `N_i`.
        undefined: why any figure above is NaN, one sentence per cause.
    """

    num_rollouts: int
    rollout_diversity: tuple[float, ...]
    diversity: float
    vendi_score: float
    diversity_short: float
    diversity_medium: float
    diversity_long: float
    rho_length_diversity: float
    rho_length_diversity_spearman: float
    rho_rate_diversity: float
    rho_rate_diversity_spearman: float
    rho_rate_diversity_given_length: float
    undefined: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """Return the figures as plain JSON types."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        values["rollout_diversity"] = list(self.rollout_diversity)
        values["undefined"] = list(self.undefined)
        return values


def estimate_semantic_prompt(
    embeddings: torch.Tensor, lengths: torch.Tensor, entropy_rates: torch.Tensor
) -> SemanticPromptEstimates:
    """Compute every semantic figure of one prompt.

    Args:
        embeddings (`torch.Tensor` of shape `[M, D]`): one embedding per rollout. Rows
            are L2-normalised here. A row that is not a finite nonzero vector leaves its
            rollout out of every figure.
        lengths (`torch.Tensor` of shape `[M]`): `N_i`.
        entropy_rates (`torch.Tensor` of shape `[M]`): `r_i`.

    Returns:
        `SemanticPromptEstimates`. Undefined figures are NaN and their reasons are listed
        in `undefined`; this function does not raise for them.
    """
    num_rollouts = embeddings.shape[0]
    if lengths.shape != (num_rollouts,) or entropy_rates.shape != (num_rollouts,):
        raise ValueError(
            f"lengths and entropy_rates must have shape [{num_rollouts}], "
            f"got {tuple(lengths.shape)} and {tuple(entropy_rates.shape)}"
        )
    undefined: list[str] = []
    unit, usable = usable_embeddings(embeddings)
    if not bool(usable.all()):
        undefined.append(UNUSABLE_EMBEDDING_REASON)
    unit = unit[usable]  # [M_u, D]
    lengths = lengths.detach().to(torch.float64).cpu()[usable]  # [M_u]
    rates = entropy_rates.detach().to(torch.float64).cpu()[usable]  # [M_u]
    count = unit.shape[0]

    diversity = rollout_diversity(unit)  # [M_u]
    all_diversity = torch.full((num_rollouts,), math.nan, dtype=torch.float64)
    all_diversity[usable] = diversity
    if count < 2:
        undefined.append(DIVERSITY_REASON)
    vendi = vendi_score(unit)
    if count == 0:
        undefined.append(VENDI_REASON)

    members = length_bucket_members(lengths)
    buckets = {}
    for name, indices in members.items():
        buckets[name] = float(diversity[indices].mean()) if indices.numel() > 0 and count >= 2 else math.nan
    if count >= 2 and any(indices.numel() == 0 for indices in members.values()):
        undefined.append(DIVERSITY_BUCKET_REASON)

    # Differences below the embedding's precision would give correlations of noise.
    compared = diversity
    if count >= 2 and float(diversity.max() - diversity.min()) <= _DIVERSITY_RESOLUTION:
        compared = torch.full_like(diversity, float(diversity.mean()))
    length_diversity = correlate(lengths, compared, x_name="length", y_name="semantic diversity")
    if count >= 2 and length_diversity.reason is not None:
        undefined.append(f"length-diversity correlation undefined: {length_diversity.reason}")
    rate_diversity = correlate(rates, compared, x_name="entropy rate", y_name="semantic diversity")
    if count >= 2 and rate_diversity.reason is not None:
        undefined.append(f"rate-diversity correlation undefined: {rate_diversity.reason}")
    partial, partial_reason = partial_correlation(
        rates, compared, lengths, x_name="entropy rate", y_name="semantic diversity"
    )
    if count >= 2 and partial_reason is not None:
        if count < 4:
            undefined.append(PARTIAL_SIZE_REASON)
        else:
            undefined.append(f"partial correlation of entropy rate and diversity given length undefined: {partial_reason}")

    return SemanticPromptEstimates(
        num_rollouts=count,
        rollout_diversity=tuple(all_diversity.tolist()),
        diversity=float(diversity.mean()) if count >= 2 else math.nan,
        vendi_score=vendi,
        diversity_short=buckets["short"],
        diversity_medium=buckets["medium"],
        diversity_long=buckets["long"],
        rho_length_diversity=length_diversity.pearson,
        rho_length_diversity_spearman=length_diversity.spearman,
        rho_rate_diversity=rate_diversity.pearson,
        rho_rate_diversity_spearman=rate_diversity.spearman,
        rho_rate_diversity_given_length=partial,
        undefined=tuple(undefined),
    )


# Across prompts


def diversity_rate_slope(
    diversity: torch.Tensor, entropy_rate: torch.Tensor, mean_length: torch.Tensor, set_codes: torch.Tensor
) -> torch.Tensor:
    """Fit prompt diversity on mean entropy rate by least squares and return the rate's coefficient.

    The design has an intercept, the mean entropy rate, the mean length and one dummy
    per prompt set after the first, so the slope compares prompts of equal length in the
    same set. A prompt with a non-finite value is left out.

    Args:
        diversity, entropy_rate, mean_length (`torch.Tensor` of shape `[..., P]`): per prompt.
        set_codes (`torch.Tensor` of shape `[..., P]`): integer code of each prompt's set.

    Returns:
        `[...]` float64: the slope, in diversity per nat of entropy rate. NaN where the
        prompts left do not pin it down: fewer prompts than the design's rank plus one,
        or an entropy rate that is a linear combination of the controls.
    """
    diversity = diversity.to(torch.float64)
    usable = torch.isfinite(diversity) & torch.isfinite(entropy_rate) & torch.isfinite(mean_length)  # [..., P]
    codes = torch.unique(set_codes)
    columns = [torch.ones_like(diversity), entropy_rate.to(torch.float64), mean_length.to(torch.float64)]
    columns += [(set_codes == code).to(torch.float64) for code in codes[1:]]
    design = torch.stack(columns, dim=-1)  # [..., P, k]
    # Rows of zeros leave the least-squares solution unchanged, so unusable prompts
    # drop out without changing the shape.
    design = torch.where(usable[..., None], design, 0.0)
    target = torch.where(usable, diversity, 0.0)  # [..., P]

    # Scale each column to a maximum magnitude of 1, so the rank tolerance is relative
    # to the data and not to its units.
    scale = design.abs().amax(dim=-2, keepdim=True)  # [..., 1, k]
    scale = torch.where(scale > 0, scale, 1.0)
    scaled = design / scale
    u, singular, vh = torch.linalg.svd(scaled, full_matrices=False)  # [..., P, r], [..., r], [..., r, k]
    kept = singular > _RANK_TOLERANCE * singular[..., :1]  # [..., r]
    rank = kept.sum(dim=-1)  # [...]
    inverse = torch.where(kept, 1.0 / torch.where(kept, singular, 1.0), 0.0)  # [..., r]
    coefficients = (vh.transpose(-1, -2) * inverse[..., None, :]) @ (u.transpose(-1, -2) @ target[..., None])
    slope = coefficients[..., 1, 0] / scale[..., 0, 1]  # [...]

    # The rate's coefficient is pinned down when its unit vector lies in the row space
    # of the design (the rate column is no combination of the other columns): then its
    # projection on the kept right singular vectors has length 1.
    projection = torch.where(kept, vh[..., :, 1], 0.0)  # [..., r]
    identified = (projection.square().sum(dim=-1) - 1.0).abs() <= math.sqrt(_RANK_TOLERANCE)
    # At least one residual degree of freedom, so an exact fit through too few prompts
    # is not reported as a slope.
    enough = usable.sum(dim=-1) > rank
    return torch.where(identified & enough, slope, math.nan)


def slope_reason(num_usable: int, num_sets: int) -> str:
    """Return why the across-prompt slope is NaN for `num_usable` prompts in `num_sets` sets."""
    num_coefficients = 3 + max(num_sets - 1, 0)
    if num_usable <= num_coefficients:
        return (
            f"the across-prompt slope of diversity on entropy rate needs more prompts than its {num_coefficients} "
            f"coefficients (intercept, entropy rate, mean length, one per extra prompt set), got {num_usable}"
        )
    return (
        "the across-prompt slope of diversity on entropy rate is undefined because the prompts' mean entropy "
        "rate is a linear function of their mean length and prompt set"
    )


@dataclass(frozen=True)
class PooledSemantic:
    """Semantic figures pooled over `P` prompts.

    `diversity`, `vendi_score` and the bucket figures are unweighted means over the
    prompts that define them. Correlations are computed within prompts and pooled
    through Fisher's z with weights `M - 3`, `M` counting the rollouts with an
    embedding. `diversity_rate_slope` is the across-prompt least-squares slope of
    prompt diversity on mean entropy rate, with an intercept, mean length and
    prompt-set dummies as controls, in diversity per nat.

    Attributes:
        num_prompts: prompts pooled.
        total_rollouts: rollouts with an embedding, over all prompts.
        intervals: `{figure: (low, high)}`, percentile bootstrap intervals over prompts.
        confidence, bootstrap_samples: settings of that bootstrap (`None` and 0 without one).
        undefined: `{reason: number of prompts}` for every cause of a NaN figure.
    """

    num_prompts: int
    total_rollouts: int
    diversity: float
    vendi_score: float
    diversity_short: float
    diversity_medium: float
    diversity_long: float
    rho_length_diversity: float
    rho_length_diversity_spearman: float
    rho_rate_diversity: float
    rho_rate_diversity_spearman: float
    rho_rate_diversity_given_length: float
    diversity_rate_slope: float
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    confidence: float | None = None
    bootstrap_samples: int = 0
    undefined: dict[str, int] = field(default_factory=dict)

    def figures(self) -> dict[str, float]:
        """Return every pooled figure by its name, without the counts and the bootstrap settings."""
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and item.name != "confidence":
                values[item.name] = value
        return values

    def to_dict(self) -> dict:
        """Return the figures as plain JSON types."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        values["intervals"] = {name: list(bounds) for name, bounds in self.intervals.items()}
        values["undefined"] = dict(self.undefined)
        return values


def semantic_columns(
    estimates: Sequence[SemanticPromptEstimates],
    entropy_rates: Sequence[float],
    mean_lengths: Sequence[float],
    set_codes: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Arrange per-prompt semantic estimates as columns `{name: [P]}` (float64), for pooling."""
    columns = {
        "n": torch.tensor([e.num_rollouts for e in estimates], dtype=torch.float64),
        "entropy_rate": torch.tensor(list(entropy_rates), dtype=torch.float64),
        "mean_length": torch.tensor(list(mean_lengths), dtype=torch.float64),
        "set_code": torch.tensor(list(set_codes), dtype=torch.float64),
    }
    for name in (*_MEAN_FIGURES, *_CORRELATION_FIGURES.values()):
        columns[name] = torch.tensor([getattr(e, name) for e in estimates], dtype=torch.float64)
    return columns


def pool_semantic_columns(columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pool columns `{name: [..., P]}` from `semantic_columns` over their last dimension.

    Returns:
        `{figure: [...]}` with the names of `PooledSemantic.figures()`.
    """
    sizes = columns["n"]
    figures = {name: mean_over_prompts(columns[name]) for name in _MEAN_FIGURES}
    for figure, column in _CORRELATION_FIGURES.items():
        figures[figure] = fisher_mean_over_prompts(columns[column], sizes)
    figures[SLOPE_FIGURE] = diversity_rate_slope(
        columns["diversity"], columns["entropy_rate"], columns["mean_length"], columns["set_code"]
    )
    return figures


def semantic_support(columns: dict[str, torch.Tensor]) -> dict[str, int]:
    """Count the prompts that contribute to each pooled figure of `pool_semantic_columns`."""
    sizes = columns["n"]
    support = {name: int(torch.isfinite(columns[name]).sum()) for name in _MEAN_FIGURES}
    for figure, column in _CORRELATION_FIGURES.items():
        support[figure] = int((torch.isfinite(columns[column]) & (sizes > 3)).sum())
    slope_defined = bool(torch.isfinite(pool_semantic_columns(columns)[SLOPE_FIGURE]))
    usable = torch.isfinite(columns["diversity"]) & torch.isfinite(columns["entropy_rate"])
    support[SLOPE_FIGURE] = int(usable.sum()) if slope_defined else 0
    return support


def pool_semantic(
    estimates: Sequence[SemanticPromptEstimates],
    *,
    entropy_rates: Sequence[float],
    mean_lengths: Sequence[float],
    prompt_sets: Sequence[str] | None = None,
    bootstrap: BootstrapConfig | None = None,
) -> PooledSemantic:
    """Pool the semantic estimates of several prompts.

    Args:
        estimates (sequence of `SemanticPromptEstimates`, at least one).
        entropy_rates (sequence of `float`): each prompt's mean entropy rate `R`, in nats.
        mean_lengths (sequence of `float`): each prompt's mean length `E[N]`.
        prompt_sets (sequence of `str`, *optional*): the set each prompt comes from, a
            control of the across-prompt slope. `None` puts every prompt in one set.
        bootstrap (`BootstrapConfig`, *optional*): resample the prompts to give each
            figure a percentile interval. Without it there are no intervals.
    """
    num_prompts = len(estimates)
    if num_prompts == 0:
        raise ValueError("pool_semantic needs the semantic estimates of at least one prompt")
    if len(entropy_rates) != num_prompts or len(mean_lengths) != num_prompts:
        raise ValueError(
            f"entropy_rates and mean_lengths need one value per prompt ({num_prompts}), "
            f"got {len(entropy_rates)} and {len(mean_lengths)}"
        )
    if prompt_sets is None:
        prompt_sets = [""] * num_prompts
    if len(prompt_sets) != num_prompts:
        raise ValueError(f"prompt_sets needs one name per prompt ({num_prompts}), got {len(prompt_sets)}")
    names = list(dict.fromkeys(prompt_sets))
    set_codes = [names.index(name) for name in prompt_sets]

    columns = semantic_columns(estimates, entropy_rates, mean_lengths, set_codes)
    figures = {name: float(value) for name, value in pool_semantic_columns(columns).items()}

    undefined = Counter(reason for e in estimates for reason in e.undefined)
    if estimates and all(e.num_rollouts <= 3 for e in estimates):
        undefined[POOLED_SEMANTIC_CORRELATION_REASON] = num_prompts
    if math.isnan(figures[SLOPE_FIGURE]):
        usable = torch.isfinite(columns["diversity"]) & torch.isfinite(columns["entropy_rate"])
        usable &= torch.isfinite(columns["mean_length"])
        present = {code for code, keep in zip(set_codes, usable.tolist()) if keep}
        undefined[slope_reason(int(usable.sum()), len(present))] = num_prompts

    intervals: dict[str, tuple[float, float]] = {}
    with_intervals = bootstrap is not None and bootstrap.samples > 0
    if with_intervals:
        if num_prompts < 2:
            undefined[BOOTSTRAP_REASON] = num_prompts
            with_intervals = False
        else:
            intervals = semantic_intervals(columns, bootstrap)
            if any(math.isnan(low) for low, _ in intervals.values()):
                undefined[THIN_SUPPORT_REASON] = num_prompts

    return PooledSemantic(
        num_prompts=num_prompts,
        total_rollouts=sum(e.num_rollouts for e in estimates),
        **figures,
        intervals=intervals,
        confidence=bootstrap.confidence if with_intervals else None,
        bootstrap_samples=bootstrap.samples if with_intervals else 0,
        undefined=dict(undefined),
    )


def semantic_intervals(columns: dict[str, torch.Tensor], bootstrap: BootstrapConfig) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over prompts for every pooled semantic figure.

    Prompts are resampled with replacement, each keeping all its rollouts, with the
    indices of `resample_indices`, so the semantic figures of a point resample the same
    prompts as its other figures. A figure that fewer than 2 prompts define gets
    `(nan, nan)`.
    """
    num_prompts = next(iter(columns.values())).shape[-1]
    indices = resample_indices(num_prompts, bootstrap)  # [B, P]
    replicates = pool_semantic_columns({name: column[indices] for name, column in columns.items()})  # {name: [B]}
    support = semantic_support(columns)
    intervals = {}
    for name, bounds in percentile_intervals(replicates, bootstrap.confidence).items():
        intervals[name] = bounds if support[name] >= 2 else (math.nan, math.nan)
    return intervals
