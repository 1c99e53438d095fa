"""W&B media and metric definitions of the monitor, besides the scalars.

Metric definitions with summaries, and at each monitoring point a rollout table,
histograms of length and entropy rate, a length-versus-rate scatter, and charts of
the headline figures and of the decomposition of CE* over training.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy

from ..measurement import Measurement
from .units import unit_factor

# The step axis of every W&B chart of a training run, as transformers' W&B integration logs it.
STEP_METRIC = "train/global_step"
# transformers' W&B integration logs every training entry under `train/`.
TRAINER_PREFIX = "train/"

# Figures charted with their interval band at every point, and their chart titles.
BAND_CHARTS = {
    "ce_star": "CE*",
    "entropy_rate": "Entropy rate",
    "mean_length": "Mean length",
    "rho_length_rate": "rho(N, r)",
    "truncation_rate": "Truncation rate",
    # On the scale of CE* the conveyance part is often too small to see, so it gets its own chart.
    "conveyance": "Conveyance Cov(N, r)",
}
# The decomposition CE* = E[N]·E[r] + Cov(N, r), as chart series.
DECOMPOSITION_SERIES = {
    "ce_star": "CE*",
    "length_driven": "length-driven E[N]·E[r]",
    "conveyance": "conveyance Cov(N, r)",
}

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


def metric_summary(name: str) -> str:
    """Return the W&B summary aggregations of the scalar `name` (without the `train/` prefix).

    A figure keeps its first, last, minimum and maximum value, so the runs table shows
    where it started, where it ended and how far it went. Intervals, standard errors,
    changes since the first point and the time share keep their last value, the
    monitoring seconds their mean and maximum, and the error count its maximum.
    """
    if name.endswith(("_ci_low", "_ci_high", "_se")) or "/change/" in name or name.endswith("time_share"):
        return "last"
    if name.endswith("seconds"):
        return "mean,max"
    if name.endswith("monitor_errors"):
        return "max"
    return "first,last,min,max"


def define_canopy_metrics(run, names: Iterable[str]) -> None:
    """Define the monitor's scalars and media in `run` against `train/global_step`.

    `names` are the scalar names as the callback logs them (`canopy/ce_star`); the W&B
    integration of transformers records them as `train/canopy/ce_star`. Interval
    bounds are hidden from the automatic panels, because the band charts show them.
    """
    run.define_metric(STEP_METRIC)
    for name in names:
        hidden = name.endswith(("_ci_low", "_ci_high"))
        run.define_metric(
            TRAINER_PREFIX + name, step_metric=STEP_METRIC, summary=metric_summary(name), hidden=hidden or None
        )
    # The media and charts of `log_rollout_media` and `log_training_charts`.
    run.define_metric("canopy/*", step_metric=STEP_METRIC)


def log_rollout_media(
    run, measurement: Measurement, step: int, *, max_rollouts_per_prompt: int = 8, units: str = "nats"
) -> None:
    """Log the rollouts of one point at `train/global_step = step`, entropies in `units`.

    - `canopy/rollouts`: a table with at most `max_rollouts_per_prompt` rollouts per
      prompt, so that its size stays bounded;
    - `canopy/length_histogram` and `canopy/entropy_rate_histogram`: histograms of
      every rollout's length and entropy rate, which W&B draws over training;
    - `canopy/length_vs_entropy_rate`: a scatter of every rollout's length against
      its entropy rate.
    """
    import wandb

    factor = unit_factor(units)
    table = wandb.Table(columns=ROLLOUT_COLUMNS, data=rollout_rows(measurement, step, max_rollouts_per_prompt, units))
    lengths = [int(length) for rollouts in measurement.rollouts for length in rollouts.stats.lengths]
    rates = [float(rate) * factor for rollouts in measurement.rollouts for rate in rollouts.stats.entropy_rates]
    # The prompt column lets a W&B custom chart colour the points by prompt.
    prompt_indices = [
        index for index, rollouts in enumerate(measurement.rollouts) for _ in range(rollouts.stats.num_rollouts)
    ]
    scatter_table = wandb.Table(
        columns=["length", "entropy_rate", "prompt_index"],
        data=[list(row) for row in zip(lengths, rates, prompt_indices)],
    )
    scatter = wandb.plot.scatter(
        scatter_table, "length", "entropy_rate", title=f"Rollout length vs entropy rate (step {step})"
    )
    # Integer-centred bins from 1 to the cap are the same at every point, so the
    # histograms of two points compare bin by bin. Truncated rollouts fill the last bin.
    cap = measurement.config.max_new_tokens
    width = math.ceil(cap / 64)
    length_edges = numpy.arange(0.5, cap + width + 0.5, width)
    # numpy.histogram rejects NaN and infinite values, so the histogram leaves them out. The table and the
    # scatter keep them.
    finite_rates = [rate for rate in rates if math.isfinite(rate)]
    histograms = {}
    if finite_rates:
        histograms["canopy/entropy_rate_histogram"] = wandb.Histogram(finite_rates, num_bins=32)
    run.log(
        {
            **histograms,
            "canopy/rollouts": table,
            "canopy/length_vs_entropy_rate": scatter,
            "canopy/length_histogram": wandb.Histogram(np_histogram=numpy.histogram(lengths, bins=length_edges)),
            STEP_METRIC: step,
        }
    )


def log_training_charts(run, points: Sequence[tuple[int, dict]], step: int, *, units: str = "nats") -> None:
    """Log line charts of the monitoring points so far at `train/global_step = step`.

    `points` are `(step, metrics)` pairs in step order, with the callback's scalar
    names (`canopy/ce_star`). `canopy/charts/decomposition` draws CE* with its
    length-driven and conveyance parts; `canopy/charts/<name>` draws a headline figure
    with the bounds of its interval. NaN values are left out of a series.
    """
    import wandb

    charts = {
        "canopy/charts/decomposition": wandb.plot.line_series(
            *_series(points, list(DECOMPOSITION_SERIES)),
            keys=list(DECOMPOSITION_SERIES.values()),
            title=f"Decomposition of CE* over training ({units})",
            xname="step",
        )
    }
    for name, title in BAND_CHARTS.items():
        names = [name, f"{name}_ci_low", f"{name}_ci_high"]
        charts[f"canopy/charts/{name}"] = wandb.plot.line_series(
            *_series(points, names),
            keys=[title, "interval low", "interval high"],
            title=f"{title} over training",
            xname="step",
        )
    run.log({**charts, STEP_METRIC: step})


def _series(points: Sequence[tuple[int, dict]], names: Sequence[str]) -> tuple[list[list], list[list]]:
    """Return per-name x and y lists of `points`, without the steps where a value is missing or NaN."""
    xs, ys = [], []
    for name in names:
        steps, values = [], []
        for point_step, metrics in points:
            value = metrics.get("canopy/" + name)
            if value is not None and math.isfinite(value):
                steps.append(point_step)
                values.append(float(value))
        xs.append(steps)
        ys.append(values)
    return xs, ys
