"""Estimators of canopy entropy, the length-rate relation and semantic diversity: pure functions over tensors."""

from .bootstrap import BootstrapConfig, check_confidence, check_samples, percentile_intervals, resample_indices
from .change import FigureChange, paired_change
from .correlation import Correlation, PooledCorrelation, average_ranks, correlate, fisher_pool, pool_correlations
from .length_views import (
    BUCKET_NAMES,
    LengthBucket,
    RunningRate,
    check_running_positions,
    default_running_positions,
    length_buckets,
    running_entropy_rates,
)
from .pooled import (
    PooledEstimates,
    fisher_mean_over_prompts,
    mean_over_prompts,
    pool_columns,
    pool_prompts,
    prompt_columns,
)
from .prompt import PromptEstimates, estimate_prompt
from .rollout import RolloutStats, summarize_rollouts
from .semantic import (
    PooledSemantic,
    SemanticPromptEstimates,
    diversity_rate_slope,
    estimate_semantic_prompt,
    partial_correlation,
    pool_semantic,
    rollout_diversity,
    vendi_score,
)

__all__ = [
    "BUCKET_NAMES",
    "BootstrapConfig",
    "Correlation",
    "FigureChange",
    "LengthBucket",
    "PooledCorrelation",
    "PooledEstimates",
    "PooledSemantic",
    "PromptEstimates",
    "RolloutStats",
    "RunningRate",
    "SemanticPromptEstimates",
    "average_ranks",
    "check_confidence",
    "check_running_positions",
    "check_samples",
    "correlate",
    "default_running_positions",
    "diversity_rate_slope",
    "estimate_prompt",
    "estimate_semantic_prompt",
    "fisher_mean_over_prompts",
    "fisher_pool",
    "length_buckets",
    "mean_over_prompts",
    "paired_change",
    "partial_correlation",
    "percentile_intervals",
    "pool_columns",
    "pool_correlations",
    "pool_prompts",
    "pool_semantic",
    "prompt_columns",
    "resample_indices",
    "rollout_diversity",
    "running_entropy_rates",
    "summarize_rollouts",
    "vendi_score",
]
