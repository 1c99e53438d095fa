"""Length-controlled views of one prompt's rollouts: length buckets and running entropy rates.

Output length confounds most uncertainty figures. These views compare entropy rates
at similar lengths: within a prompt, short, medium and long rollouts separately, and
the mean rate over the first `t` tokens of the rollouts that reached `t`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Sequence

import torch

from .rollout import RolloutStats

BUCKET_NAMES = ("short", "medium", "long")

# The first running position; later ones double it up to the length cap.
FIRST_RUNNING_POSITION = 16


@dataclass(frozen=True)
class LengthBucket:
    """Rollouts of one length bucket of a prompt.

    Attributes:
        num_rollouts: rollouts in the bucket (0 when the prompt has too few to fill it).
        mean_length: mean `N_i` of those rollouts, NaN when the bucket is empty.
        entropy_rate: mean `r_i` of those rollouts, NaN when the bucket is empty.
    """

    num_rollouts: int
    mean_length: float
    entropy_rate: float


def length_buckets(stats: RolloutStats) -> dict[str, LengthBucket]:
    """Split a prompt's rollouts into short, medium and long thirds by length.

    Rollouts are ranked by `N_i`; equal lengths keep their sampling order, which is
    random, so ties are split arbitrarily but without bias. Bucket `k` takes ranks
    `round(k M / 3)` up to `round((k + 1) M / 3)`, so `M = 8` gives sizes 3, 2 and 3, and
    with `M = 2` the medium bucket is empty.

    Returns:
        `{"short": LengthBucket, "medium": LengthBucket, "long": LengthBucket}`.
    """
    num_rollouts = stats.num_rollouts
    order = torch.argsort(stats.lengths, stable=True)  # [M]
    lengths = stats.lengths.to(torch.float64)[order]
    rates = stats.entropy_rates[order]
    bounds = [round(k * num_rollouts / 3) for k in range(4)]

    buckets = {}
    for index, name in enumerate(BUCKET_NAMES):
        members = slice(bounds[index], bounds[index + 1])
        count = bounds[index + 1] - bounds[index]
        if count == 0:
            buckets[name] = LengthBucket(0, float("nan"), float("nan"))
        else:
            buckets[name] = LengthBucket(count, float(lengths[members].mean()), float(rates[members].mean()))
    return buckets


def default_running_positions(max_new_tokens: int) -> tuple[int, ...]:
    """Return 16, 32, 64, ... up to and including `max_new_tokens` (empty below 16)."""
    positions = []
    position = FIRST_RUNNING_POSITION
    while position <= max_new_tokens:
        positions.append(position)
        position *= 2
    return tuple(positions)


def check_running_positions(
    positions: Sequence[int] | None, max_new_tokens: int, name: str = "running_positions"
) -> tuple[int, ...] | None:
    """Return `positions` sorted and without repeats; `None` stays `None` (the defaults).

    Raises:
        `ValueError`: `positions` is not a list of integers from 1 to `max_new_tokens`.
    """
    if positions is None:
        return None
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Iterable):
        raise ValueError(f"{name} must be a list of token positions such as [16, 32, 64], got {positions!r}.")
    checked = []
    for position in positions:
        if isinstance(position, bool) or not isinstance(position, numbers.Integral) or not 1 <= position <= max_new_tokens:
            raise ValueError(
                f"{name} must contain integers from 1 to the length cap max_new_tokens={max_new_tokens}, "
                f"got {position!r}."
            )
        checked.append(int(position))
    return tuple(sorted(set(checked)))


@dataclass(frozen=True)
class RunningRate:
    """Running entropy rate of one prompt at position `t`.

    Attributes:
        entropy_rate: mean over the rollouts with `N_i >= t` of `(sum_{s <= t} h_s) / t`,
            NaN when no rollout reached `t`.
        active_share: share of the rollouts with `N_i >= t`.
    """

    entropy_rate: float
    active_share: float


def running_entropy_rates(
    step_entropies: torch.Tensor, lengths: torch.Tensor, positions: Sequence[int]
) -> dict[int, RunningRate]:
    """Compute the running entropy rate at each position `t` of `positions`.

    Args:
        step_entropies (`torch.Tensor` of shape `[M, K]`): `h_t` per generated position;
            positions at or after `lengths[i]` are ignored.
        lengths (`torch.Tensor` of shape `[M]`): `N_i`.
        positions (sequence of `int`): token positions `t >= 1`, counted from the first
            generated token.

    Returns:
        `{t: RunningRate}` in the order of `positions`.
    """
    num_rollouts, num_positions = step_entropies.shape
    steps = torch.arange(num_positions)  # [K]
    active = steps[None, :] < lengths[:, None]  # [M, K]
    cumulative = torch.where(active, step_entropies.to(torch.float64), 0.0).cumsum(dim=1)  # [M, K]

    rates = {}
    for position in positions:
        if position < 1:
            raise ValueError(f"running entropy rate positions must be at least 1, got {position}")
        reached = lengths >= position  # [M]
        count = int(reached.sum())
        if count == 0 or position > num_positions:
            rates[position] = RunningRate(float("nan"), count / num_rollouts)
            continue
        prefix_rates = cumulative[reached, position - 1] / position  # [count]
        rates[position] = RunningRate(float(prefix_rates.mean()), count / num_rollouts)
    return rates
