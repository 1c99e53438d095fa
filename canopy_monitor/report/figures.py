"""Figures of `canopy-monitor report`, drawn with matplotlib's Agg canvas.

Each function returns a `matplotlib.figure.Figure` built without `pyplot`, so no
global figure state is kept and no display is needed. The plotted data stay on the
artists (lines, band polygons, scatter offsets, histogram bars), where the tests
read them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .load import RolloutPoint, Run, Series

# Above this cap, histogram bins group several lengths so that bars stay visible.
MAX_HISTOGRAM_BINS = 64
BAND_ALPHA = 0.25
CAP_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.0}
END_STYLE = {"color": "0.55", "linestyle": ":", "linewidth": 1.2}
PROMPT_COLORS = "tab10"


@dataclass(frozen=True)
class Metric:
    """A logged figure as the report shows it: `name` without `canopy/`, a label and a y-axis label."""

    name: str
    label: str
    axis_label: str


def headline_metrics(units: str) -> list[Metric]:
    """Return the figures drawn over training, with axis labels in `units`."""
    return [
        Metric("ce_star", "canopy entropy CE*", f"CE* ({units})"),
        Metric("entropy_rate", "entropy rate r", f"entropy rate ({units}/token)"),
        Metric("mean_length", "mean length E[N]", "mean length (tokens)"),
        Metric("rho_length_rate", "length-rate correlation ρ(N, r)", "ρ(N, r), pooled Pearson"),
        Metric("truncation_rate", "truncation rate", "share of rollouts cut at the cap"),
    ]


def semantic_metrics() -> list[Metric]:
    return [
        Metric("semantic/diversity", "semantic diversity", "mean diversity d"),
        Metric("semantic/vendi_score", "Vendi score", "effective number of answers"),
        Metric("semantic/rho_rate_diversity_given_length", "ρ(r, d | N)", "partial correlation ρ(r, d | N)"),
    ]


def interval_label(run: Run) -> str:
    if run.confidence is None:
        return "bootstrap interval"
    return f"{run.confidence:.0%} bootstrap interval"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _isolated(values: np.ndarray) -> np.ndarray:
    """Mark the finite entries whose neighbours are both missing: a band cannot show them."""
    finite = np.isfinite(values)
    before = np.concatenate([[False], finite[:-1]])
    after = np.concatenate([finite[1:], [False]])
    return finite & ~before & ~after


def plot_series(
    axes, series: Series, *, label: str, color: str, band_label: str, linestyle: str = "-", marker: str = "o"
) -> Line2D:
    """Draw `series` as a line with markers and its interval as a band.

    NaN values leave gaps. A point with no defined neighbour gets an error bar,
    since a band of one point has no width.
    """
    (line,) = axes.plot(
        series.steps, series.values, marker=marker, markersize=4, color=color, linestyle=linestyle, label=label
    )
    if series.low is not None:
        axes.fill_between(
            series.steps, series.low, series.high, color=color, alpha=BAND_ALPHA, linewidth=0, label=band_label
        )
        bounded = np.isfinite(series.low) & np.isfinite(series.high) & np.isfinite(series.values)
        alone = _isolated(np.where(bounded, series.values, np.nan))
        if alone.any():
            below = series.values[alone] - series.low[alone]
            above = series.high[alone] - series.values[alone]
            axes.errorbar(
                series.steps[alone],
                series.values[alone],
                yerr=np.vstack([np.maximum(below, 0.0), np.maximum(above, 0.0)]),
                fmt="none",
                ecolor=color,
                alpha=0.6,
                capsize=3,
            )
    if not np.isfinite(series.values).any():
        message = "undefined at every point" if series.steps.size else "not logged in this run"
        axes.text(
            0.5, 0.5, message, transform=axes.transAxes, ha="center", va="center", color="0.4",
            bbox={"facecolor": "white", "edgecolor": "none"},
        )
    return line


def _finish_training_axes(axes, run: Run) -> None:
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, color="0.92")
    if run.max_steps is not None and run.steps[-1] < run.max_steps:
        axes.axvline(run.max_steps, **END_STYLE)
    axes.set_xlabel("training step")
    # Every panel spans the same steps, from the first point to max_steps when training has not reached it,
    # so panels line up even where a figure is undefined at every point.
    left = run.steps[0]
    right = max(run.steps[-1], run.max_steps or 0)
    margin = 0.04 * max(right - left, 1)
    axes.set_xlim(left - margin, right + margin)


def _legend_handles(run: Run, band_label: str, *, color: str = "C0", band: bool = True) -> list:
    handles = [Line2D([], [], color=color, marker="o", markersize=4, label="pooled over prompts")]
    if band:
        handles.append(Patch(color=color, alpha=BAND_ALPHA, label=band_label))
    if run.max_steps is not None and run.steps[-1] < run.max_steps:
        handles.append(Line2D([], [], label=f"max_steps = {run.max_steps}", **END_STYLE))
    return handles


def headline_figure(run: Run) -> Figure:
    """Draw CE*, entropy rate, mean length, ρ(N, r) and truncation rate over training, one panel each."""
    figure = _new_figure(12.0, 6.5)
    # No shared x axis: the panel above the legend cell needs its own tick labels.
    panels = list(figure.subplots(2, 3).flat)
    band_label = interval_label(run)
    for axes, metric in zip(panels, headline_metrics(run.units)):
        plot_series(axes, run.series(metric.name), label=metric.label, color="C0", band_label=band_label)
        if metric.name == "rho_length_rate":
            axes.axhline(0.0, color="0.6", linewidth=0.8)
        axes.set_title(metric.label)
        axes.set_ylabel(metric.axis_label)
        _finish_training_axes(axes, run)

    # The sixth cell shows the legend that every panel shares.
    legend_axes = panels[-1]
    legend_axes.axis("off")
    handles = _legend_handles(run, band_label, band=run.has_intervals())
    legend_axes.legend(handles=handles, loc="center", frameon=False)
    return figure


def decomposition_figure(run: Run) -> Figure:
    """Draw CE* with its length-driven part E[N]·E[r] above, and the conveyance part Cov(N, r) below."""
    figure = _new_figure(11.0, 6.5)
    top, bottom = figure.subplots(2, 1)
    band_label = interval_label(run)
    units = run.units

    plot_series(top, run.series("ce_star"), label="CE*", color="C0", band_label=f"CE* {band_label}")
    # Dashed, so that CE* stays visible where the conveyance part is too small to separate the two lines.
    plot_series(
        top,
        run.series("length_driven"),
        label="length-driven part E[N]·E[r]",
        color="C1",
        band_label=f"E[N]·E[r] {band_label}",
        linestyle="--",
        marker="s",
    )
    top.set_title("CE* and its length-driven part E[N]·E[r]")
    top.set_ylabel(f"entropy ({units})")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    _finish_training_axes(top, run)

    plot_series(
        bottom,
        run.series("conveyance"),
        label="conveyance part Cov(N, r)",
        color="C2",
        band_label=f"Cov(N, r) {band_label}",
    )
    bottom.axhline(0.0, color="0.6", linewidth=0.8)
    bottom.set_title("conveyance part Cov(N, r) = CE* − E[N]·E[r]")
    bottom.set_ylabel(f"entropy ({units})")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    _finish_training_axes(bottom, run)
    return figure


def compared_rollout_points(run: Run) -> list[RolloutPoint]:
    """Return the first and the last point with rollout records (one when only one has them)."""
    if not run.rollouts:
        return []
    if len(run.rollouts) == 1:
        return [run.rollouts[0]]
    return [run.rollouts[0], run.rollouts[-1]]


def _point_title(run: Run, point: RolloutPoint) -> str:
    title = f"step {point.step}"
    matches = [entry for entry in run.points if entry["step"] == point.step]
    if matches:
        rho = run.value(matches[0], "rho_length_rate")
        title += f", ρ(N, r) = {rho:.2f}" if math.isfinite(rho) else ", ρ(N, r) undefined"
    return title


def length_rate_scatter_figure(run: Run) -> Figure | None:
    """Draw each rollout's length against its entropy rate at the first and last recorded points.

    The panels share both axes. Colours tell prompts apart, because ρ(N, r) is
    computed within each prompt. Returns `None` when the run has no rollout records.
    """
    points = compared_rollout_points(run)
    if not points:
        return None
    figure = _new_figure(5.0 * len(points) + 1.0, 4.5)
    panels = np.atleast_1d(figure.subplots(1, len(points), sharex=True, sharey=True, squeeze=False)[0])
    for axes, point in zip(panels, points):
        finite = np.isfinite(point.lengths) & np.isfinite(point.entropy_rates)
        colors = _prompt_colors(point.prompt_index[finite])
        axes.scatter(
            point.lengths[finite], point.entropy_rates[finite], c=colors, s=22, alpha=0.75, linewidths=0
        )
        axes.set_title(_point_title(run, point))
        axes.set_xlabel("length N (tokens)")
        axes.grid(True, color="0.92")
        if point.cap is not None:
            axes.axvline(point.cap, label=f"cap T = {point.cap}", **CAP_STYLE)
            axes.legend(loc="best", fontsize="small")
    panels[0].set_ylabel(f"entropy rate r ({run.units}/token)")
    return figure


def _prompt_colors(prompt_index: np.ndarray) -> np.ndarray:
    # The palette repeats after 10 prompts, so colours then tell neighbours apart, not every prompt.
    palette = colormaps[PROMPT_COLORS]
    return palette(prompt_index % palette.N)


def histogram_edges(run: Run, points: list[RolloutPoint]) -> np.ndarray:
    """Return bin edges shared by every panel: one bin per length, or wider bins above a cap of 64."""
    top = run.cap or 1
    for point in points:
        finite = point.lengths[np.isfinite(point.lengths)]
        if finite.size:
            top = max(top, int(finite.max()))
    width = max(1, math.ceil(top / MAX_HISTOGRAM_BINS))
    # Edges at half-integers put each integer length inside a bin, the cap in the last one.
    count = math.ceil(top / width)
    return 0.5 + width * np.arange(count + 1)


def length_histogram_figure(run: Run) -> Figure | None:
    """Draw the histogram of rollout lengths at the first and last recorded points, on the same bins.

    Returns `None` when the run has no rollout records.
    """
    points = compared_rollout_points(run)
    if not points:
        return None
    edges = histogram_edges(run, points)
    figure = _new_figure(5.0 * len(points) + 1.0, 4.0)
    panels = np.atleast_1d(figure.subplots(1, len(points), sharex=True, sharey=True, squeeze=False)[0])
    for axes, point in zip(panels, points):
        lengths = point.lengths[np.isfinite(point.lengths)]
        axes.hist(lengths, bins=edges, color="C0", alpha=0.8, rwidth=0.9, label="rollouts")
        if point.cap is not None:
            axes.axvline(point.cap, label=f"cap T = {point.cap}", **CAP_STYLE)
        truncated = int(point.truncated.sum())
        title = f"step {point.step}: {truncated} of {point.lengths.size} rollouts cut at the cap"
        if point.cap is not None:
            # A rollout whose end-of-sequence token is its T-th token ends at the cap without being cut.
            at_cap = int((lengths == point.cap).sum())
            if at_cap != truncated:
                title = f"step {point.step}: {at_cap} of {point.lengths.size} rollouts at the cap, {truncated} of them cut"
        axes.set_title(title)
        axes.set_xlabel("length N (tokens)")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(loc="best", fontsize="small")
    panels[0].set_ylabel("rollouts")
    return figure


def has_semantic(run: Run) -> bool:
    return any(run.has_metric(metric.name) for metric in semantic_metrics())


def semantic_figure(run: Run) -> Figure | None:
    """Draw semantic diversity, the Vendi score and ρ(r, d | N) at the points where they were measured.

    Returns `None` when no point measured semantic figures.
    """
    if not has_semantic(run):
        return None
    figure = _new_figure(12.0, 3.8)
    panels = figure.subplots(1, 3, sharex=True)
    band_label = interval_label(run)
    banded = False
    for axes, metric in zip(panels, semantic_metrics()):
        series = run.series(metric.name, measured_only=True)
        banded = banded or series.has_interval
        plot_series(axes, series, label=metric.label, color="C4", band_label=band_label)
        if metric.name.endswith("given_length"):
            axes.axhline(0.0, color="0.6", linewidth=0.8)
        axes.set_title(metric.label)
        axes.set_ylabel(metric.axis_label)
        _finish_training_axes(axes, run)
    handles = _legend_handles(run, band_label, color="C4", band=banded)
    panels[0].legend(handles=handles, loc="best", fontsize="small")
    return figure
