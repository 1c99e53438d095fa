"""The JSON document that `canopy-monitor evaluate` writes."""

from __future__ import annotations

from ..measurement import Measurement
from .metrics import json_safe
from .units import check_units, convert_nested


def measurement_report(
    measurement: Measurement, *, units: str = "nats", warnings: list[str] | None = None, **config
) -> dict:
    """Build `{"config", "pooled", "seconds", "warnings", "prompts"}` from a measurement.

    `config` contains what identifies the run (model, prompt source, ...); the sampling
    settings, the bootstrap settings, the running positions and `units` are added to
    it. Each entry of `prompts` has the prompt text, its figures and its `rollouts`
    (`text`, `length`, `entropy_sum`, `surprisal_sum`, `entropy_rate`, `truncated`).
    When the measurement has semantic figures, the document also has `semantic` (the
    embedding model, the pooled figures with their intervals, and the seconds spent),
    each prompt its `prompt_set` and `semantic` figures, each rollout its `diversity`,
    and the semantic reasons of NaN figures are counted in `pooled.undefined` too.
    Entropy-valued figures are in `units`. NaN becomes `null`.
    """
    check_units(units)
    semantic = measurement.semantic
    prompts = []
    for index, (prompt_rollouts, estimates) in enumerate(zip(measurement.rollouts, measurement.estimates)):
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
        if semantic is not None:
            figures = semantic.prompts[index].to_dict()
            for rollout, diversity in zip(entry["rollouts"], figures.pop("rollout_diversity")):
                rollout["diversity"] = diversity
            entry["prompt_set"] = semantic.prompt_sets[index]
            entry["semantic"] = figures
        prompts.append(entry)

    bootstrap = measurement.bootstrap.to_dict() if measurement.bootstrap is not None else None
    pooled = convert_nested(measurement.pooled.to_dict(), units)
    document = {
        "config": {
            **config,
            **measurement.config.to_dict(),
            "num_prompts": len(prompts),
            "units": units,
            "bootstrap": bootstrap,
            "running_positions": list(measurement.running_positions),
        },
        "pooled": pooled,
        "seconds": measurement.seconds,
        "warnings": list(warnings or []),
        "prompts": convert_nested(prompts, units),
    }
    if semantic is not None:
        document["config"]["embedding_model"] = semantic.embedding_model
        document["semantic"] = {
            "embedding_model": semantic.embedding_model,
            "pooled": convert_nested(semantic.pooled.to_dict(), units),
            "seconds": semantic.seconds,
        }
        pooled["undefined"] = {**pooled["undefined"], **semantic.pooled.undefined}
    return json_safe(document)
