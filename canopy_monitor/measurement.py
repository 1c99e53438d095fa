"""One measurement: sample the rollouts of every prompt and estimate the figures."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

from .config import SamplingConfig
from .estimators import PooledEstimates, PromptEstimates, estimate_prompt, pool_prompts
from .prompts import Prompt
from .sampling import PromptRollouts, sample_rollouts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """Rollouts and estimates of one model on a set of prompts.

    Attributes:
        config (`SamplingConfig`): the decoding policy and budget used.
        rollouts (`list[PromptRollouts]`): per prompt, in prompt order.
        estimates (`list[PromptEstimates]`): per prompt, in prompt order.
        pooled (`PooledEstimates`): pooled over the prompts.
        seconds (`float`): wall time of sampling and estimation.
    """

    config: SamplingConfig
    rollouts: list[PromptRollouts]
    estimates: list[PromptEstimates]
    pooled: PooledEstimates
    seconds: float


def measure(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    config: SamplingConfig,
    *,
    eos_token_ids: Sequence[int] | None = None,
    show_progress: bool = False,
) -> Measurement:
    """Sample `config.num_rollouts` rollouts per prompt and compute every estimate.

    See `sample_rollouts` for how sampling treats the model and the random state.
    """
    start = time.perf_counter()
    rollouts = sample_rollouts(
        model, tokenizer, prompts, config, eos_token_ids=eos_token_ids, show_progress=show_progress
    )
    estimates = [estimate_prompt(r.stats) for r in rollouts]
    pooled = pool_prompts(estimates)
    return Measurement(
        config=config,
        rollouts=rollouts,
        estimates=estimates,
        pooled=pooled,
        seconds=time.perf_counter() - start,
    )
