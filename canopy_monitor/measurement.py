"""One measurement: sample the rollouts of every prompt and estimate the figures."""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from dataclasses import dataclass
from typing import Sequence

from .config import SamplingConfig
from .estimators import (
    BootstrapConfig,
    PooledEstimates,
    PromptEstimates,
    check_running_positions,
    default_running_positions,
    estimate_prompt,
    pool_prompts,
)
from .prompts import Prompt
from .sampling import PromptRollouts, sample_rollouts
from .semantic import SemanticMeasurement, SentenceEmbedder, measure_semantic, model_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """Rollouts and estimates of one model on a set of prompts.

    Attributes:
        config (`SamplingConfig`): the decoding policy and budget used.
        bootstrap (`BootstrapConfig` or `None`): the bootstrap behind the pooled intervals.
        running_positions (`tuple[int, ...]`): positions of the running entropy rates.
        rollouts (`list[PromptRollouts]`): per prompt, in prompt order.
        estimates (`list[PromptEstimates]`): per prompt, in prompt order.
        pooled (`PooledEstimates`): pooled over the prompts.
        seconds (`float`): wall time of sampling and estimation, and of the semantic figures
            when `measure` computed them.
        semantic (`SemanticMeasurement` or `None`): semantic diversity of the rollouts,
            when it was measured.
    """

    config: SamplingConfig
    bootstrap: BootstrapConfig | None
    running_positions: tuple[int, ...]
    rollouts: list[PromptRollouts]
    estimates: list[PromptEstimates]
    pooled: PooledEstimates
    seconds: float
    semantic: SemanticMeasurement | None = None


def measure(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    config: SamplingConfig,
    *,
    eos_token_ids: Sequence[int] | None = None,
    bootstrap: BootstrapConfig | None = BootstrapConfig(),
    running_positions: Sequence[int] | None = None,
    show_progress: bool = False,
    embedder: SentenceEmbedder | None = None,
    prompt_sets: Sequence[str] | None = None,
) -> Measurement:
    """Sample `config.num_rollouts` rollouts per prompt and compute every estimate.

    See `sample_rollouts` for how sampling treats the model and the random state.

    Args:
        bootstrap (`BootstrapConfig`, *optional*): percentile bootstrap over prompts for
            the pooled intervals; `None` skips it.
        running_positions (sequence of `int`, *optional*): positions of the running
            entropy rate; by default 16, 32, 64, ... up to the length cap.
        embedder (`SentenceEmbedder`, *optional*): also measure semantic diversity,
            embedding the texts on the model's device (see `measure_semantic`).
        prompt_sets (sequence of `str`, *optional*): the set each prompt comes from, a
            control of the across-prompt slope of diversity on entropy rate.

    Raises:
        `EmbeddingModelError`: `embedder` is given and its model cannot be loaded.
    """
    start = time.perf_counter()
    positions = check_running_positions(running_positions, config.max_new_tokens)
    rollouts = sample_rollouts(
        model, tokenizer, prompts, config, eos_token_ids=eos_token_ids, show_progress=show_progress
    )
    measurement = estimate_rollouts(rollouts, config, bootstrap=bootstrap, running_positions=positions, started=start)
    if embedder is None:
        return measurement
    semantic = measure_semantic(measurement, embedder, device=model_device(model), prompt_sets=prompt_sets)
    return dataclasses.replace(measurement, semantic=semantic, seconds=time.perf_counter() - start)


def estimate_rollouts(
    rollouts: Sequence[PromptRollouts],
    config: SamplingConfig,
    *,
    bootstrap: BootstrapConfig | None = BootstrapConfig(),
    running_positions: Sequence[int] | None = None,
    started: float | None = None,
) -> Measurement:
    """Compute every estimate from rollouts already sampled with `config`, one entry per prompt.

    Args:
        bootstrap, running_positions: as in `measure`.
        started (`float`, *optional*): `time.perf_counter()` when sampling started, so
            that `Measurement.seconds` counts it; by default only estimation is counted.
    """
    start = time.perf_counter() if started is None else started
    positions = check_running_positions(running_positions, config.max_new_tokens)
    if positions is None:
        positions = default_running_positions(config.max_new_tokens)
    estimates = [estimate_prompt(r.stats, r.step_entropies, running_positions=positions) for r in rollouts]
    pooled = pool_prompts(estimates, bootstrap)
    return Measurement(
        config=config,
        bootstrap=bootstrap,
        running_positions=positions,
        rollouts=list(rollouts),
        estimates=estimates,
        pooled=pooled,
        seconds=time.perf_counter() - start,
    )


# Default truncation share above which `truncation_warning` returns a warning.
DEFAULT_TRUNCATION_WARNING = 0.2


def check_truncation_threshold(threshold: float, name: str = "truncation_warning") -> float:
    """Return `threshold` as a `float` if it is a number from 0 to 1, else raise `ValueError`."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 1:
        raise ValueError(f"{name} must be a share of rollouts from 0 to 1, such as 0.2, got {threshold!r}.")
    return float(threshold)


def format_share(value: float) -> str:
    """Format a share as a percentage with the digits it needs: 0.95 -> 95%, 0.999 -> 99.9%."""
    return f"{value * 100:.4g}%"


def truncation_warning(measurement: Measurement, threshold: float) -> str | None:
    """Return a warning when the pooled truncation rate exceeds `threshold`, else `None`."""
    rate = measurement.pooled.truncation_rate
    if not rate > threshold:
        return None
    return (
        f"{format_share(rate)} of the rollouts reached the length cap of {measurement.config.max_new_tokens} "
        f"tokens without ending (warning threshold {format_share(threshold)}). CE* and the other figures then describe the "
        "capped process, so the cap, not the model, sets part of the length. Raise max_new_tokens, or read "
        "the completed/ figures, which use only the rollouts that ended."
    )
