"""The JSON document that `canopy-monitor evaluate` writes."""

from __future__ import annotations

from ..measurement import Measurement
from .metrics import json_safe


def measurement_report(measurement: Measurement, **config) -> dict:
    """Build `{"config", "pooled", "prompts"}` from a measurement.

    `config` contains what identifies the run (model, prompt source, ...); the sampling
    settings are added to it. Each entry of `prompts` has the prompt text, its figures
    and its `rollouts` (`text`, `length`, `entropy_sum`, `surprisal_sum`, `entropy_rate`,
    `truncated`). NaN becomes `null`.
    """
    prompts = []
    for prompt_rollouts, estimates in zip(measurement.rollouts, measurement.estimates):
        stats = prompt_rollouts.stats
        rates = stats.entropy_rates
        entry = {"prompt": prompt_rollouts.prompt.display}
        if prompt_rollouts.prompt.messages is not None:
            entry["messages"] = [dict(message) for message in prompt_rollouts.prompt.messages]
        entry.update(estimates.to_dict())
        entry["rollouts"] = [
            {
                "text": prompt_rollouts.texts[i],
                "length": int(stats.lengths[i]),
                "entropy_sum": float(stats.entropy_sums[i]),
                "surprisal_sum": float(stats.surprisal_sums[i]),
                "entropy_rate": float(rates[i]),
                "truncated": bool(stats.truncated[i]),
            }
            for i in range(stats.num_rollouts)
        ]
        prompts.append(entry)

    document = {
        "config": {**config, **measurement.config.to_dict(), "num_prompts": len(prompts)},
        "pooled": measurement.pooled.to_dict(),
        "seconds": measurement.seconds,
        "prompts": prompts,
    }
    return json_safe(document)
