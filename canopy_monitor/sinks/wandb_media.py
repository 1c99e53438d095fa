"""Rollout table and length-versus-rate chart for an active W&B run."""

from __future__ import annotations

import math

from ..measurement import Measurement
from .units import unit_factor

ROLLOUT_COLUMNS = [
    "step",
    "prompt_index",
    "prompt",
    "rollout_index",
    "text",
    "length",
    "entropy_sum",
    "entropy_rate",
    "surprisal_sum",
    "truncated",
    "diversity",
]


def rollout_rows(
    measurement: Measurement, step: int, max_rollouts_per_prompt: int, units: str = "nats"
) -> list[list]:
    """Return one table row per rollout, at most `max_rollouts_per_prompt` per prompt,
    with entropies in `units`.

    The `diversity` column contains each rollout's semantic diversity `d_i`, NaN when the
    measurement has no semantic figures or the rollout has none.
    """
    factor = unit_factor(units)
    semantic = measurement.semantic
    rows = []
    for prompt_index, prompt_rollouts in enumerate(measurement.rollouts):
        stats = prompt_rollouts.stats
        rates = stats.entropy_rates
        if semantic is not None:
            diversity = semantic.prompts[prompt_index].rollout_diversity
        else:
            diversity = (math.nan,) * stats.num_rollouts
        for rollout_index in range(min(stats.num_rollouts, max_rollouts_per_prompt)):
            rows.append(
                [
                    step,
                    prompt_index,
                    prompt_rollouts.prompt.display,
                    rollout_index,
                    prompt_rollouts.texts[rollout_index],
                    int(stats.lengths[rollout_index]),
                    float(stats.entropy_sums[rollout_index]) * factor,
                    float(rates[rollout_index]) * factor,
                    float(stats.surprisal_sums[rollout_index]) * factor,
                    bool(stats.truncated[rollout_index]),
                    float(diversity[rollout_index]),
                ]
            )
    return rows


def log_rollout_media(
    run, measurement: Measurement, step: int, *, max_rollouts_per_prompt: int = 8, units: str = "nats"
) -> None:
    """Log the rollout table (`canopy/rollouts`) and a scatter of length against entropy
    rate (`canopy/length_vs_entropy_rate`) at `train/global_step = step`.

    The scatter uses every rollout; the table keeps at most `max_rollouts_per_prompt`
    rollouts per prompt so that its size stays bounded. Entropies are in `units`.
    """
    import wandb

    factor = unit_factor(units)
    table = wandb.Table(columns=ROLLOUT_COLUMNS, data=rollout_rows(measurement, step, max_rollouts_per_prompt, units))
    points = [
        [int(length), float(rate) * factor]
        for prompt_rollouts in measurement.rollouts
        for length, rate in zip(prompt_rollouts.stats.lengths, prompt_rollouts.stats.entropy_rates)
    ]
    scatter_table = wandb.Table(columns=["length", "entropy_rate"], data=points)
    scatter = wandb.plot.scatter(
        scatter_table, "length", "entropy_rate", title=f"Rollout length vs entropy rate (step {step})"
    )
    run.log(
        {
            "canopy/rollouts": table,
            "canopy/length_vs_entropy_rate": scatter,
            "train/global_step": step,
        }
    )
