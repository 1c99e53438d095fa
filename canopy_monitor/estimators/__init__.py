"""Estimators of canopy entropy and the length-rate relation: pure functions over tensors."""

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
from .pooled import PooledEstimates, pool_columns, pool_prompts, prompt_columns
from .prompt import PromptEstimates, estimate_prompt
from .rollout import RolloutStats, summarize_rollouts

__all__ = [
    "BUCKET_NAMES",
    "BootstrapConfig",
    "Correlation",
    "FigureChange",
    "LengthBucket",
    "PooledCorrelation",
    "PooledEstimates",
    "PromptEstimates",
    "RolloutStats",
    "RunningRate",
    "average_ranks",
    "check_confidence",
    "check_running_positions",
    "check_samples",
    "correlate",
    "default_running_positions",
    "estimate_prompt",
    "fisher_pool",
    "length_buckets",
    "paired_change",
    "percentile_intervals",
    "pool_columns",
    "pool_correlations",
    "pool_prompts",
    "prompt_columns",
    "resample_indices",
    "running_entropy_rates",
    "summarize_rollouts",
]
