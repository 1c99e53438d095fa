"""The W&B run of a monitored training: metric definitions, summaries, histograms, charts and alerts.

Every test reads a real offline `.wandb` file written by the `wandb` package.
"""

import json
import math
from pathlib import Path

import numpy
import pytest

from canopy_monitor import CanopyMonitorCallback
from canopy_monitor.alerts import check_alert_threshold, figure_moves
from canopy_monitor.sinks.wandb_media import BAND_CHARTS, metric_summary

from test_callback import HELDOUT, make_trainer, read_history
from wandb_records import history_rows, records, summary_items

wandb = pytest.importorskip("wandb")

NUM_ROLLOUTS = 4
MAX_NEW_TOKENS = 8


def train_with_wandb(tmp_path, monkeypatch, num_rollouts=NUM_ROLLOUTS, **monitor_settings) -> tuple[Path, Path]:
    """Train a tiny model for 4 steps with points at 0, 2 and 4; return the `.wandb` file and the output dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "canopy-monitor-tests")
    output_dir = tmp_path / "out"
    trainer = make_trainer(output_dir, max_steps=4, report_to=["wandb"])
    callback = CanopyMonitorCallback(
        trainer,
        prompts=HELDOUT[:3],
        every_n_steps=2,
        num_rollouts=num_rollouts,
        max_new_tokens=MAX_NEW_TOKENS,
        **monitor_settings,
    )
    trainer.add_callback(callback)
    trainer.train()
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    (run_file,) = run_dir.glob("*.wandb")
    return run_file, output_dir


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    try:
        yield train_with_wandb(tmp_path_factory.mktemp("wandb"), monkeypatch)
    finally:
        monkeypatch.undo()


def metric_definitions(run_file: Path) -> dict:
    return {metric.name: metric for metric in records(run_file, "metric") if metric.name}


def summary_ops(metric) -> set[str]:
    return {field.name for field, value in metric.summary.ListFields() if value}


def test_figures_defined_against_global_step(wandb_run):
    run_file, _ = wandb_run
    definitions = metric_definitions(run_file)

    figure = definitions["train/canopy/ce_star"]
    assert figure.step_metric == "train/global_step"
    assert summary_ops(figure) == {"first", "last", "min", "max"}
    assert not figure.options.hidden
    interval = definitions["train/canopy/ce_star_ci_low"]
    assert summary_ops(interval) == {"last"}
    assert interval.options.hidden
    assert summary_ops(definitions["train/canopy/change/ce_star"]) == {"last"}
    assert summary_ops(definitions["train/canopy/monitor_seconds"]) == {"mean", "max"}
    assert summary_ops(definitions["train/canopy/monitor_errors"]) == {"max"}
    # The change figures appear from the second point on, and are defined before it.
    assert "train/canopy/change/rho_length_rate_ci_high" in definitions


def test_summary_holds_first_last_min_max(wandb_run):
    run_file, output_dir = wandb_run
    values = [record["metrics"]["canopy/ce_star"] for record in read_history(output_dir)]

    summary = json.loads(summary_items(run_file)["train/canopy/ce_star"])

    assert summary["first"] == pytest.approx(values[0])
    assert summary["last"] == pytest.approx(values[-1])
    assert summary["min"] == pytest.approx(min(values))
    assert summary["max"] == pytest.approx(max(values))


def test_histograms_count_every_rollout(wandb_run):
    run_file, output_dir = wandb_run
    rows = [row for row in history_rows(run_file) if "canopy/length_histogram/_type" in row]
    rollouts = json.loads((output_dir / "canopy_monitor" / "rollouts" / "step-00000000.json").read_text())
    lengths = [length for prompt in rollouts["prompts"] for length in prompt["lengths"]]

    assert [int(float(row["train/global_step"])) for row in rows] == [0, 2, 4]
    first = rows[0]
    counts = json.loads(first["canopy/length_histogram/values"])
    edges = json.loads(first["canopy/length_histogram/bins"])
    assert edges == [edge + 0.5 for edge in range(MAX_NEW_TOKENS + 1)]
    assert counts == numpy.histogram(lengths, bins=edges)[0].tolist()
    # Every point uses the same length bins, so histograms compare bin by bin.
    assert {row["canopy/length_histogram/bins"] for row in rows} == {first["canopy/length_histogram/bins"]}
    for row in rows:
        assert sum(json.loads(row["canopy/entropy_rate_histogram/values"])) == 3 * NUM_ROLLOUTS


def chart_table(run_file: Path, row: dict, key: str) -> list[list]:
    path = run_file.parent / "files" / json.loads(row[f"{key}_table/path"])
    return json.loads(path.read_text())["data"]


def test_decomposition_chart_holds_every_point(wandb_run):
    run_file, output_dir = wandb_run
    history = read_history(output_dir)
    rows = [row for row in history_rows(run_file) if "canopy/charts/decomposition_table/path" in row]
    assert [int(float(row["train/global_step"])) for row in rows] == [0, 2, 4]

    data = chart_table(run_file, rows[-1], "canopy/charts/decomposition")

    series = {}
    for step, key, value in data:
        series.setdefault(key, []).append((step, value))
    expected = {
        "CE*": "canopy/ce_star",
        "length-driven E[N]·E[r]": "canopy/length_driven",
        "conveyance Cov(N, r)": "canopy/conveyance",
    }
    assert set(series) == set(expected)
    for key, name in expected.items():
        assert [step for step, _ in series[key]] == [0, 2, 4]
        assert [value for _, value in series[key]] == pytest.approx([record["metrics"][name] for record in history])
    # CE* = E[N]·E[r] + Cov(N, r) at every point.
    for (_, total), (_, length_driven), (_, conveyance) in zip(*series.values()):
        assert total == pytest.approx(length_driven + conveyance, rel=1e-9)


@pytest.mark.parametrize("name", list(BAND_CHARTS))
def test_band_chart_holds_interval(wandb_run, name):
    run_file, output_dir = wandb_run
    history = read_history(output_dir)
    row = [row for row in history_rows(run_file) if f"canopy/charts/{name}_table/path" in row][-1]

    data = chart_table(run_file, row, f"canopy/charts/{name}")

    by_key = {}
    for step, key, value in data:
        by_key.setdefault(key, []).append(value)
    # A series leaves out the points where its value is NaN (`null` in the history).
    for key, suffix in [(BAND_CHARTS[name], ""), ("interval low", "_ci_low"), ("interval high", "_ci_high")]:
        expected = [record["metrics"][f"canopy/{name}{suffix}"] for record in history]
        expected = [value for value in expected if value is not None]
        assert by_key.get(key, []) == pytest.approx(expected), key


def test_scatter_table_names_prompts(wandb_run):
    run_file, _ = wandb_run
    row = [row for row in history_rows(run_file) if "canopy/length_vs_entropy_rate_table/path" in row][0]

    data = chart_table(run_file, row, "canopy/length_vs_entropy_rate")

    assert [prompt_index for _, _, prompt_index in data] == [index for index in range(3) for _ in range(NUM_ROLLOUTS)]


def test_band_chart_skips_nan_values(tmp_path, monkeypatch):
    # With 3 rollouts per prompt the pooled Pearson correlation is NaN at every point.
    run_file, _ = train_with_wandb(tmp_path, monkeypatch, num_rollouts=3, bootstrap_samples=0)
    row = [row for row in history_rows(run_file) if "canopy/charts/rho_length_rate_table/path" in row][-1]

    assert chart_table(run_file, row, "canopy/charts/rho_length_rate") == []
    ce_star = chart_table(run_file, row, "canopy/charts/ce_star")
    assert [key for _, key, _ in ce_star] == ["CE*"] * 3


def test_alerts_follow_threshold(tmp_path, monkeypatch):
    run_file, output_dir = train_with_wandb(tmp_path, monkeypatch, alert_ce_star_change=1e-9, alert_rho_change=100.0)
    history = read_history(output_dir)
    values = [record["metrics"]["canopy/ce_star"] for record in history]

    alerts = records(run_file, "alert")

    # rho(N, r) lies in [-1, 1], so a threshold of 100 never fires.
    assert [alert.title for alert in alerts] == [
        "canopy-monitor: CE* moved at step 2",
        "canopy-monitor: CE* moved at step 4",
    ]
    assert {alert.level for alert in alerts} == {"WARN"}
    assert f"{values[1] - values[0]:+.4g} nats between steps 0 and 2" in alerts[0].text
    assert "alert_ce_star_change=1e-09" in alerts[0].text


def test_no_alerts_without_threshold(wandb_run):
    run_file, _ = wandb_run

    assert records(run_file, "alert") == []


def test_metric_summary_per_kind():
    assert metric_summary("canopy/ce_star") == "first,last,min,max"
    assert metric_summary("canopy/semantic/vendi_score") == "first,last,min,max"
    assert metric_summary("canopy/ce_star_ci_high") == "last"
    assert metric_summary("canopy/ce_star_se") == "last"
    assert metric_summary("canopy/change/conveyance") == "last"
    assert metric_summary("canopy/monitor_time_share") == "last"
    assert metric_summary("canopy/semantic/seconds") == "mean,max"
    assert metric_summary("canopy/monitor_errors") == "max"


def test_figure_moves_strictly_above_threshold():
    previous = {"canopy/ce_star": 10.0, "canopy/rho_length_rate": 0.5}
    current = {"canopy/ce_star": 12.0, "canopy/rho_length_rate": 0.25}

    moves = figure_moves(0, previous, 5, current, {"ce_star": 2.0, "rho_length_rate": 0.2})

    assert [move.name for move in moves] == ["rho_length_rate"]
    assert moves[0].delta == pytest.approx(-0.25)
    assert (moves[0].previous_step, moves[0].step) == (0, 5)


def test_figure_moves_ignores_nan_and_none():
    previous = {"canopy/ce_star": math.nan, "canopy/rho_length_rate": None}
    current = {"canopy/ce_star": 50.0, "canopy/rho_length_rate": 0.9}

    assert figure_moves(0, previous, 5, current, {"ce_star": 1.0, "rho_length_rate": 0.1}) == []
    assert figure_moves(0, {"canopy/ce_star": 1.0}, 5, {"canopy/ce_star": 9.0}, {"ce_star": None}) == []


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "5"])
def test_alert_threshold_rejects_invalid(value):
    with pytest.raises(ValueError, match="alert_ce_star_change"):
        check_alert_threshold(value, "alert_ce_star_change")


def test_callback_rejects_invalid_alert_threshold(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)

    with pytest.raises(ValueError, match="alert_rho_change"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, alert_rho_change=-0.1)
    with pytest.raises(ValueError, match="max_table_rollouts_per_prompt"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, max_table_rollouts_per_prompt=0)
