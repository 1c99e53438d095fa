"""Percentile bootstrap over prompts: settings, resampled indices and intervals."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch


def check_samples(value, name: str = "samples") -> int:
    """Return `value` as an `int` if it is 0 (no bootstrap) or at least 2, else raise `ValueError`.

    One resample would give an interval of zero width, which would look like certainty.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0 or value == 1:
        raise ValueError(f"{name} must be 0 (no intervals) or an integer of at least 2, got {value!r}.")
    return int(value)


def check_confidence(value, name: str = "confidence") -> float:
    """Return `value` as a `float` if it lies strictly between 0 and 1, else raise `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, such as 0.95, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class BootstrapConfig:
    """Settings of the percentile bootstrap over prompts.

    The resampled prompt indices depend only on `seed`, the number of prompts and
    `samples`, so every monitoring point of a run, and both sides of a comparison,
    resample the same prompts.

    Args:
        samples (`int`, *optional*, defaults to `1000`): bootstrap resamples, at least 2;
            `0` turns the intervals off.
        confidence (`float`, *optional*, defaults to `0.95`): coverage of each interval,
            strictly between 0 and 1.
        seed (`int`, *optional*, defaults to `0`): seed of the resampling generator.
    """

    samples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        # Frozen: the checked values (NumPy numbers become Python ones) are set through object.
        object.__setattr__(self, "samples", check_samples(self.samples))
        object.__setattr__(self, "confidence", check_confidence(self.confidence))
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed < 2**63:
            raise ValueError(f"bootstrap seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}.")
        object.__setattr__(self, "seed", int(self.seed))

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
