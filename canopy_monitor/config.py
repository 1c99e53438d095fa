"""Typed settings shared by the sampler, the callback and the command line."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Below this, logits divided by the temperature can overflow float32 to infinity.
MIN_TEMPERATURE = 1e-30


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding policy and budget of one monitoring point.

    These settings stay fixed for a whole run, so that two monitoring points differ
    only in the weights (common random numbers).

    Args:
        num_rollouts (`int`, *optional*, defaults to `8`):
            Rollouts sampled per prompt (`M`). At least 2; correlations need at least 3
            and their pooled weights `M - 3` need at least 4.
        max_new_tokens (`int`, *optional*, defaults to `128`):
            Length cap `T`. A rollout that reaches it without an end-of-sequence token
            is truncated.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of the decoding policy, at least `1e-30`.
        top_k (`int`, *optional*, defaults to `0`):
            Keep only the `top_k` most likely tokens; `0` disables the filter.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus filter; `1.0` disables it.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sampler's random numbers, reused at every monitoring point:
            with a prompt's position in the list it seeds that prompt's draws
            (`sampling.draws`). From 0 to `2**63 - 1`.
        use_chat_template (`bool`, *optional*, defaults to `True`):
            Format prompts with the tokenizer's chat template when it has one.
            `False` feeds plain text.
        batch_size (`int`, *optional*):
            Maximum number of rollouts sampled together. The sampler's own loop uses
            exactly this many rows; the `generate` fallback rounds it down to a whole
            number of prompts, never below one. By default it is chosen from the memory
            free when sampling starts (`sampling.memory.batch_rows`). The sampler's loop
            draws the same rollouts for a seed whatever the batch size; only the
            `generate` fallback draws differently with another value.
    """

    num_rollouts: int = 8
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    use_chat_template: bool = True
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_rollouts, int) or self.num_rollouts < 2:
            raise ValueError(
                f"num_rollouts must be an integer of at least 2, got {self.num_rollouts!r}: "
                "canopy entropy needs several rollouts per prompt (8 or more is typical)."
            )
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        if not isinstance(self.temperature, (int, float)) or not MIN_TEMPERATURE <= self.temperature < math.inf:
            raise ValueError(
                f"temperature must be a finite number of at least {MIN_TEMPERATURE}, got {self.temperature!r}. "
                "Canopy entropy is defined for sampling; for greedy decoding use top_k=1."
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}.")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(
                f"batch_size must be a positive integer, or None to choose it from the free memory, "
                f"got {self.batch_size!r}."
            )

    def to_dict(self) -> dict:
        return asdict(self)
