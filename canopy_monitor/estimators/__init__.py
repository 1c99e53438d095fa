"""Estimators of canopy entropy and the length-rate relation: pure functions over tensors."""

from .correlation import Correlation, PooledCorrelation, average_ranks, correlate, fisher_pool, pool_correlations
from .pooled import PooledEstimates, pool_prompts
from .prompt import PromptEstimates, estimate_prompt
from .rollout import RolloutStats, summarize_rollouts

__all__ = [
    "Correlation",
    "PooledCorrelation",
    "PooledEstimates",
    "PromptEstimates",
    "RolloutStats",
    "average_ranks",
    "correlate",
    "estimate_prompt",
    "fisher_pool",
    "pool_correlations",
    "pool_prompts",
    "summarize_rollouts",
]
