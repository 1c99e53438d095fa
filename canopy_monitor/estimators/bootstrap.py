"""Percentile bootstrap over prompts: settings, resampled indices and intervals."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class BootstrapConfig:
    """Settings of the percentile bootstrap over prompts.

    The resampled prompt indices depend only on `seed`, the number of prompts and
    `samples`, so every monitoring point of a run, and both sides of a comparison,
    resample the same prompts.

    Args:
        samples (`int`, *optional*, defaults to `1000`): bootstrap resamples; `0` turns
            the intervals off.
        confidence (`float`, *optional*, defaults to `0.95`): coverage of each interval,
            strictly between 0 and 1.
        seed (`int`, *optional*, defaults to `0`): seed of the resampling generator.
    """

    samples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise ValueError(f"bootstrap samples must be a non-negative integer (0 turns it off), got {self.samples!r}.")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) or not 0 < self.confidence < 1:
            raise ValueError(f"bootstrap confidence must be a number strictly between 0 and 1, got {self.confidence!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"bootstrap seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


def resample_indices(num_prompts: int, bootstrap: BootstrapConfig) -> torch.Tensor:
    """Draw `[samples, num_prompts]` prompt indices with replacement from the config's seed."""
    generator = torch.Generator().manual_seed(bootstrap.seed)
    return torch.randint(num_prompts, (bootstrap.samples, num_prompts), generator=generator)


def percentile_intervals(replicates: dict[str, torch.Tensor], confidence: float) -> dict[str, tuple[float, float]]:
    """Return `{name: (low, high)}`, the central `confidence` range of each `[B]` replicate series.

    Replicates where a figure is NaN (no resampled prompt defines it) are left out;
    a figure that is NaN in every replicate gets `(nan, nan)`.
    """
    tail = (1.0 - confidence) / 2.0
    quantiles = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    intervals = {}
    for name, values in replicates.items():
        values = values.to(torch.float64)
        values = torch.where(torch.isfinite(values), values, math.nan)
        low, high = torch.nanquantile(values, quantiles).tolist()
        intervals[name] = (low, high)
    return intervals
