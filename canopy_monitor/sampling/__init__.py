"""Sampling: a model, a tokenizer and prompts in, per-rollout figures out."""

from .policy import build_warpers, policy_generation_defaults
from .recorder import StepEntropyRecorder
from .sampler import PolicyGeneration, PromptRollouts, preserved_state, resolve_eos_token_ids, rollout_lengths, sample_rollouts

__all__ = [
    "PolicyGeneration",
    "PromptRollouts",
    "StepEntropyRecorder",
    "build_warpers",
    "policy_generation_defaults",
    "preserved_state",
    "resolve_eos_token_ids",
    "rollout_lengths",
    "sample_rollouts",
]
