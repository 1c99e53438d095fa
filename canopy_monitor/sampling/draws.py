"""Random numbers of the decoding loop, fixed per prompt, rollout and step.

Each rollout `j` of the prompt with key `k` draws its token at step `t` by inverse
transform sampling from the uniform `U[k][j, t]`. The uniforms of a prompt come from
their own generator, seeded with the sampling seed and the prompt's key. So a
rollout's tokens depend only on the model, the prompt, the seed and the key: not on
the batch size, on which prompts share a batch, on the order in which prompts are
sampled or on how prompts are split across processes. Two monitoring points also
draw every rollout from the same uniforms (common random numbers), so their
difference reflects the weights more than the sampling noise.
"""

from __future__ import annotations

import numpy as np
import torch


def prompt_seed(seed: int, key: int) -> int:
    """Return the seed of the uniforms of the prompt with `key`, mixed from both with `numpy.random.SeedSequence`.

    The key is a spawn key, not a second entropy word: `SeedSequence([seed, key])` splits
    a seed above 2**32 into 32-bit words and pads short entropy with zeros, so
    `(5, 1)` and `(5 + 2**32, 0)` would share their uniforms.
    """
    if seed < 0 or key < 0:
        raise ValueError(f"the sampling seed and the prompt key must be non-negative, got seed={seed}, key={key}.")
    return int(np.random.SeedSequence(seed, spawn_key=(key,)).generate_state(1, dtype=np.uint64)[0])


def rollout_uniforms(seed: int, key: int, num_rollouts: int, max_new_tokens: int, device=None) -> torch.Tensor:
    """Return the uniforms `[M, T]` in [0, 1), float64, of the prompt with `key`.

    They are drawn on the CPU, so they are the same whatever device the model is on.
    """
    generator = torch.Generator(device="cpu").manual_seed(prompt_seed(seed, key))
    uniforms = torch.rand((num_rollouts, max_new_tokens), generator=generator, dtype=torch.float64)
    return uniforms.to(device) if device is not None else uniforms


def inverse_transform_sample(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Return, for each row of `logprobs` `[B, V]`, the token whose cumulative probability first exceeds `uniforms` `[B]`.

    Token `v` is drawn with probability `softmax` mass `p_v`, and a token of
    probability 0 (removed by a filter) is never drawn. The cumulative sums are in
    float64, and each row's uniform is scaled by its own total, so a total that
    differs from 1 by rounding does not bias the draw.
    """
    cumulative = logprobs.to(torch.float64).exp().cumsum(dim=-1)  # [B, V]
    totals = cumulative[:, -1:].contiguous()  # [B, 1]
    tokens = torch.searchsorted(cumulative, uniforms.to(torch.float64)[:, None] * totals, right=True)  # [B, 1]
    # `u * total` may round up to `total` itself. The last token of positive
    # probability is the first position where the cumulative sum reaches the total.
    last_positive = torch.searchsorted(cumulative, totals, right=False)  # [B, 1]
    return torch.minimum(tokens, last_positive).squeeze(1)
