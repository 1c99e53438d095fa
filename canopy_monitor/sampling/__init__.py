"""Sampling: a model, a tokenizer and prompts in, per-rollout figures out."""

from .recorder import StepEntropyRecorder
from .sampler import PromptRollouts, build_warpers, preserved_state, resolve_eos_token_ids, rollout_lengths, sample_rollouts

__all__ = [
    "PromptRollouts",
    "StepEntropyRecorder",
    "build_warpers",
    "preserved_state",
    "resolve_eos_token_ids",
    "rollout_lengths",
    "sample_rollouts",
]
