"""Per-rollout quantities: length, step-entropy sum, surprisal sum, truncation."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RolloutStats:
    """Per-rollout figures of the `M` rollouts of one prompt.

    Attributes:
        lengths (`torch.Tensor` of shape `[M]`, int64): `N_i`, the end-of-sequence token included.
        entropy_sums (`torch.Tensor` of shape `[M]`, float64): `S_i = sum_t h_t`, in nats.
        surprisal_sums (`torch.Tensor` of shape `[M]`, float64): `L_i = sum_t -log pi(y_t | x, y_<t)`, in nats.
        truncated (`torch.Tensor` of shape `[M]`, bool): the length cap cut the rollout.
    """

    lengths: torch.Tensor
    entropy_sums: torch.Tensor
    surprisal_sums: torch.Tensor
    truncated: torch.Tensor

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.lengths, self.entropy_sums, self.surprisal_sums, self.truncated)}
        if len(shapes) != 1 or self.lengths.dim() != 1:
            raise ValueError(f"rollout tensors must all have the same 1-D shape [M], got shapes {sorted(shapes)}")
        if bool((self.lengths < 1).any()):
            raise ValueError("every rollout must have a length of at least 1 token")

    @property
    def num_rollouts(self) -> int:
        return self.lengths.numel()

    @property
    def entropy_rates(self) -> torch.Tensor:
        """`r_i = S_i / N_i` `[M]`, in nats per token."""
        return self.entropy_sums / self.lengths.to(torch.float64)

    def subset(self, keep: torch.Tensor) -> "RolloutStats":
        """Return the rollouts where `keep` `[M]` (bool) is true, in their order."""
        return RolloutStats(
            lengths=self.lengths[keep],
            entropy_sums=self.entropy_sums[keep],
            surprisal_sums=self.surprisal_sums[keep],
            truncated=self.truncated[keep],
        )


def summarize_rollouts(
    step_entropies: torch.Tensor,
    token_logprobs: torch.Tensor,
    lengths: torch.Tensor,
    truncated: torch.Tensor,
) -> RolloutStats:
    """Reduce step-level records of `M` rollouts to their per-rollout sums.

    Args:
        step_entropies (`torch.Tensor` of shape `[M, K]`): `h_t` of the decoding policy at
            each generated position; positions at or after `lengths[i]` are ignored.
        token_logprobs (`torch.Tensor` of shape `[M, K]`): `log pi(y_t | x, y_<t)` of the
            sampled tokens; positions at or after `lengths[i]` are ignored.
        lengths (`torch.Tensor` of shape `[M]`): `N_i`, with `1 <= N_i <= K`.
        truncated (`torch.Tensor` of shape `[M]`, bool): the cap cut the rollout.
    """
    num_positions = step_entropies.shape[1]
    positions = torch.arange(num_positions, device=lengths.device)  # [K]
    active = positions[None, :] < lengths[:, None]  # [M, K]

    # `where` rather than a product: a masked position may hold inf or NaN.
    entropy_sums = torch.where(active, step_entropies.to(torch.float64), 0.0).sum(dim=1)  # [M]
    surprisal_sums = -torch.where(active, token_logprobs.to(torch.float64), 0.0).sum(dim=1)  # [M]
    return RolloutStats(
        lengths=lengths.to(torch.int64).cpu(),
        entropy_sums=entropy_sums.cpu(),
        surprisal_sums=surprisal_sums.cpu(),
        truncated=truncated.to(torch.bool).cpu(),
    )
