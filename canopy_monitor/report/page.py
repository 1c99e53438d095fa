"""The HTML page of `canopy-monitor report`: one self-contained file plus the same figures as PNGs.

The page embeds each PNG as a base64 `data:` URI and carries its own CSS, so it
opens offline and can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from . import figures
from .load import ROLLOUTS_FOLDER, Run, load_run
from .summary import format_steps, headline_rows, run_facts, training_status, undefined_reasons

logger = logging.getLogger(__name__)

PAGE_FILE = "report.html"
REPORT_FOLDER = "report"
# Every PNG the report can write. One left by an earlier report but not drawn now is deleted.
FIGURE_FILES = (
    "over_training.png",
    "decomposition.png",
    "length_vs_entropy_rate.png",
    "length_histogram.png",
    "semantic.png",
)
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1200px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { padding: 0.3em 0.8em; text-align: left; vertical-align: top; border-bottom: 1px solid #eee; }
th { background: #f5f5f5; }
td.number { font-variant-numeric: tabular-nums; white-space: nowrap; }
.interval, .note { color: #666; font-size: 0.9em; }
.status { background: #f6f8fa; border-left: 4px solid #888; padding: 0.5em 0.8em; }
figure { margin: 1em 0 2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { max-width: 900px; margin-top: 0.4em; }
"""


@dataclass
class ReportFigure:
    """A drawn figure with the file it is saved to, its heading and its caption (plain text)."""

    file_name: str
    heading: str
    figure: Figure
    caption: str


def default_output_directory(run: Run) -> Path:
    return run.monitor_directory / REPORT_FOLDER


def build_figures(run: Run) -> tuple[list[ReportFigure], dict[str, str]]:
    """Draw the report's figures and return them with the sentences that replace the ones left out.

    The second value maps a section (`"rollouts"`, `"semantic"`) to the sentence
    shown where its figures would be.
    """
    drawn = [
        ReportFigure("over_training.png", "Headline figures over training", figures.headline_figure(run),
                     _headline_caption(run)),
        ReportFigure("decomposition.png", "Decomposition of CE*", figures.decomposition_figure(run),
                     _decomposition_caption(run)),
    ]
    missing = {}

    scatter = figures.length_rate_scatter_figure(run)
    histogram = figures.length_histogram_figure(run)
    if scatter is not None and histogram is not None:
        drawn.append(ReportFigure("length_vs_entropy_rate.png", "Length against entropy rate, rollout by rollout",
                                  scatter, _scatter_caption(run)))
        drawn.append(ReportFigure("length_histogram.png", "Rollout lengths", histogram, _histogram_caption(run)))
    else:
        missing["rollouts"] = (
            f"No per-rollout records were found in {run.monitor_directory / ROLLOUTS_FOLDER}, so the scatter of "
            "length against entropy rate and the length histograms are left out. Runs of versions before the "
            "records existed, and runs with rollout_record_points=0, keep none."
        )

    semantic = figures.semantic_figure(run)
    if semantic is not None:
        drawn.append(ReportFigure("semantic.png", "Semantic diversity over training", semantic,
                                  _semantic_caption(run)))
    else:
        missing["semantic"] = (
            "Semantic diversity was not measured in this run. Turn it on with the callback's "
            "semantic_every_n_points (it needs the semantic extra, pip install -e \".[semantic]\" in the repository)."
        )
    return drawn, missing


def figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_report(run_directory: str | os.PathLike, output_directory: str | os.PathLike | None = None) -> Path:
    """Write the report of the run in `run_directory` and return the path of its HTML page.

    The page and one PNG per figure go to `output_directory`, by default
    `<run_directory>/canopy_monitor/report/`. PNGs of an earlier report that this
    one does not draw are deleted, so the folder matches the page.

    Raises:
        `FileNotFoundError`: the run directory or its history does not exist.
        `ValueError`: the history has no complete point, or the output folder cannot be written.
    """
    run = load_run(run_directory)
    output = Path(output_directory) if output_directory is not None else default_output_directory(run)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the output folder {output}: {error.strerror or error}") from None

    drawn, missing = build_figures(run)
    images = {}
    for item in drawn:
        images[item.file_name] = figure_png(item.figure)
    try:
        for name, data in images.items():
            (output / name).write_bytes(data)
        for name in FIGURE_FILES:
            if name not in images:
                (output / name).unlink(missing_ok=True)
        page = output / PAGE_FILE
        temporary = page.with_name(page.name + ".tmp")
        temporary.write_text(render_page(run, drawn, images, missing), encoding="utf-8")
        os.replace(temporary, page)
    except OSError as error:
        raise ValueError(f"cannot write the report to {output}: {error.strerror or error}") from None

    logger.info(
        "canopy-monitor report: %d monitoring point(s), %d figure(s) written to %s", len(run.points), len(images), output
    )
    return page


def render_page(run: Run, drawn: list[ReportFigure], images: dict[str, bytes], missing: dict[str, str]) -> str:
    """Return the HTML page, each figure embedded from `images` (file name to PNG bytes)."""
    title = (run.info or {}).get("run_name") or run.directory.name or str(run.directory)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>canopy-monitor report: {_text(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>canopy-monitor report: {_text(title)}</h1>",
        f'<p class="note">Written {_text(time.strftime("%Y-%m-%d %H:%M:%S %z"))} from {_text(run.directory)}.</p>',
        f'<p class="status">{_text(training_status(run))}</p>',
        _facts_table(run),
        "<h2>Headline figures: first and last monitoring point</h2>",
        _headline_table(run),
    ]
    by_name = {item.file_name: item for item in drawn}
    for name in ("over_training.png", "decomposition.png"):
        parts.append(_figure_section(by_name[name], images[name]))

    parts.append("<h2>Single rollouts</h2>")
    if "rollouts" in missing:
        parts.append(f"<p>{_text(missing['rollouts'])}</p>")
    else:
        for name in ("length_vs_entropy_rate.png", "length_histogram.png"):
            parts.append(_figure_section(by_name[name], images[name], level="h3"))

    if "semantic" in missing:
        parts.append("<h2>Semantic diversity</h2>")
        parts.append(f"<p>{_text(missing['semantic'])}</p>")
    else:
        parts.append(_figure_section(by_name["semantic.png"], images["semantic.png"]))

    reasons = undefined_reasons(run)
    if reasons:
        parts.append(f"<h2>Undefined figures at step {run.steps[-1]}</h2>")
        parts.append("<p>Figures that were NaN at the last point, by reason, with how many prompts it affected:</p>")
        parts.append("<ul>" + "".join(f"<li>{_text(reason)}</li>" for reason in reasons) + "</ul>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _text(value) -> str:
    # Python decodes a path with bytes that are not UTF-8 into lone surrogates (surrogateescape).
    # UTF-8 cannot encode them, so they are shown as U+FFFD.
    text = str(value).encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return html.escape(text, quote=True)


def _facts_table(run: Run) -> str:
    rows = "".join(f"<tr><th>{_text(label)}</th><td>{_text(value)}</td></tr>" for label, value in run_facts(run))
    return f'<table class="facts">{rows}</table>'


def _cell(cell: tuple[str, str], step: int | None) -> str:
    value, interval = cell
    text = _text(value)
    if interval:
        text += f' <span class="interval">{_text(interval)}</span>'
    if step is not None:
        text += f' <span class="note">(step {step})</span>'
    return f'<td class="number">{text}</td>'


def _headline_table(run: Run) -> str:
    first, last = run.steps[0], run.steps[-1]
    interval = figures.interval_label(run) if run.has_intervals() else None
    header = (
        "<tr><th>figure</th>"
        f"<th>first point (step {first})</th>"
        f"<th>last point (step {last})</th>"
        "<th>change since the first point</th></tr>"
    )
    body = "".join(
        "<tr>"
        f"<th>{_text(row.label)}</th>"
        f"{_cell(row.first, row.first_step)}"
        f"{_cell(row.last, row.last_step)}"
        f"{_cell(row.change, None)}"
        "</tr>"
        for row in headline_rows(run)
    )
    if interval is not None:
        note = (
            f"Brackets give the {interval} of each value. For a change, they give the interval of a paired "
            "bootstrap that resamples the same prompts at both points. A change whose interval excludes 0 is unlikely to come "
            "from the choice of prompts alone."
        )
    else:
        note = "The run logged no intervals (bootstrap_samples=0), so the values stand without brackets."
    return f"<table>{header}{body}</table>\n<p class=\"note\">{_text(note)}</p>"


def _figure_section(item: ReportFigure, png: bytes, level: str = "h2") -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f"<{level}>{_text(item.heading)}</{level}>\n"
        f'<figure><img src="data:image/png;base64,{data}" alt="{_text(item.heading)}">'
        f"<figcaption>{_text(item.caption)}</figcaption></figure>"
    )


def _band_sentence(run: Run, *, paired_change: bool = True) -> str:
    if not run.has_intervals():
        return "There are no bands: the run logged no intervals (bootstrap_samples=0)."
    sentence = f"The shaded band is the {figures.interval_label(run)} over prompts."
    if paired_change:
        sentence += (
            " Bands of two points can overlap while their change is clear: the paired change interval in the "
            "table above is the test of a change."
        )
    return sentence


def _progress_sentences(run: Run) -> list[str]:
    sentences = []
    if len(run.steps) == 1:
        sentences.append(
            "There is only one monitoring point so far, so each panel shows one marker, its interval as an error bar."
        )
    if run.max_steps is not None and run.steps[-1] < run.max_steps:
        sentences.append(f"The dotted vertical line marks max_steps ({run.max_steps}), which training has not reached.")
    return sentences


def _headline_caption(run: Run) -> str:
    units = run.units
    sentences = [
        "Each panel shows one figure at every monitoring point (x: training step), pooled over the held-out "
        "prompts.",
        _band_sentence(run),
        f"CE* ({units}) is the entropy of whole rollouts, length and content together: it falls when answers "
        "become shorter, more predictable per token, or both, and the other panels tell which.",
        f"The entropy rate r ({units} per token) is the uncertainty per token, and the mean length E[N] is "
        "counted in tokens under the cap.",
        "ρ(N, r) is the correlation of a rollout's length with its entropy rate, computed within each prompt and "
        "pooled: positive when longer answers carry more information per token, negative when they are more "
        "formulaic per token.",
        "The truncation rate is the share of rollouts the cap cut. When it is high, the cap sets part of the "
        "length, and CE* describes the capped process.",
        "A gap in a line marks a point where the figure was undefined (see the list at the end of the page).",
    ]
    return " ".join(sentences + _progress_sentences(run))


def _decomposition_caption(run: Run) -> str:
    sentences = [
        "CE* = E[N]·E[r] + Cov(N, r) holds exactly at every point.",
        "The length-driven part E[N]·E[r] (upper panel) is the canopy entropy that the mean length and the mean "
        "entropy rate would give if length and rate were unrelated. When it follows CE*, the change comes from "
        "length or from the per-token rate, which the headline panels separate.",
        "The conveyance part Cov(N, r) (lower panel, on its own scale because it is usually small) is the rest. "
        "A positive conveyance part means longer answers carry more information per token, and a negative one "
        "means longer answers are more formulaic per token. A growing conveyance part means the model spends length "
        "where it is uncertain.",
        _band_sentence(run),
    ]
    return " ".join(sentences + _progress_sentences(run))


def _compared_steps(run: Run) -> str:
    points = figures.compared_rollout_points(run)
    if len(points) == 1:
        return f"the only monitoring point with per-rollout records (step {points[0].step})"
    return (
        f"the first and the last monitoring points with per-rollout records (steps {points[0].step} and "
        f"{points[-1].step}, left and right)"
    )


def _scatter_caption(run: Run) -> str:
    cap = run.cap
    cap_text = f"The dashed line is the cap T = {cap} tokens: a rollout on it was cut, " if cap is not None else (
        "A rollout at the cap was cut, "
    )
    return " ".join(
        [
            f"Each dot is one rollout at {_compared_steps(run)}: its length N against its entropy rate r "
            f"({run.units} per token), coloured by prompt. The panels share both axes.",
            cap_text + "and its length says nothing about where the model would have stopped.",
            "ρ(N, r) is computed within each prompt and then pooled, so read a slope within one colour, not "
            "across colours. The title gives the pooled value at that point. Points rising to the right within a "
            "colour mean longer answers carry more information per token.",
        ]
    )


def _histogram_caption(run: Run) -> str:
    return " ".join(
        [
            f"The number of rollouts of each length at {_compared_steps(run)}, on the same bins.",
            "Rollouts cut at the cap pile up in the last bin, at the dashed line, with the few that ended exactly "
            "at the cap. The panel title counts both. A growing pile there means the "
            "cap, not the model, sets more of the length, and CE* then describes the capped process. Then raise "
            "the cap or read the completed-only figures (canopy/completed/...). Mass moving left means shorter answers.",
        ]
    )


def _semantic_caption(run: Run) -> str:
    steps = [int(step) for step in run.series("semantic/diversity", measured_only=True).steps]
    return " ".join(
        [
            f"Semantic figures at the points where they were measured (steps {format_steps(steps)}), from "
            "sentence embeddings of the rollout texts.",
            "Diversity is one minus a rollout's mean cosine similarity to the other rollouts of its prompt, "
            "averaged: 0 when every rollout says the same, near 1 for unrelated texts. A fall means the answers "
            "converge on one meaning, even if their wording or length still varies.",
            "The Vendi score is the effective number of distinct answers per prompt, from 1 to the number of "
            "rollouts.",
            "ρ(r, d | N) is the within-prompt correlation of entropy rate and diversity at equal length: positive "
            "when rollouts that were more uncertain per token also ended up saying something different.",
            _band_sentence(run, paired_change=False),
        ]
    )
