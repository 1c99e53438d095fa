"""Resumed runs: the monitor's state in checkpoints, and a history with no lost or repeated point."""

import json
import math

import pytest
from transformers import TrainerCallback

import canopy_monitor.callback as callback_module
from canopy_monitor import CanopyMonitorCallback

from test_callback import HELDOUT, make_trainer, read_history

SETTINGS = dict(prompts=HELDOUT[:3], every_n_steps=2, num_rollouts=4, max_new_tokens=8, bootstrap_samples=50)


class StopAt(TrainerCallback):
    """Stop training after `step`, as a crash or a time limit would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def checkpointed_trainer(output_dir, max_steps=6):
    trainer = make_trainer(output_dir, max_steps=max_steps)
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 2
    return trainer


def monitored(trainer, **overrides):
    callback = CanopyMonitorCallback(trainer, **{**SETTINGS, **overrides})
    trainer.add_callback(callback)
    return callback


def figures(record):
    return {
        name: value
        for name, value in record["metrics"].items()
        if name not in ("canopy/monitor_seconds", "canopy/monitor_time_share")
    }


def assert_same_figures(first, second):
    assert first.keys() == second.keys()
    for name, value in first.items():
        if value is None or math.isnan(value):
            assert second[name] is None or math.isnan(second[name]), name
        else:
            assert second[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_checkpoint_holds_monitor_state_and_history(tmp_path):
    trainer = checkpointed_trainer(tmp_path, max_steps=4)
    monitored(trainer)
    trainer.train()

    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["canopy_monitor"]
    snapshot = tmp_path / "checkpoint-2" / "canopy_monitor" / "history.jsonl"
    assert saved["steps"] == [0, 2]
    assert saved["num_points"] == 2
    assert saved["num_errors"] == 0
    assert saved["failed_steps"] == []
    assert saved["batch_size"] >= 4
    assert [json.loads(line)["step"] for line in snapshot.read_text().splitlines()] == [0, 2]
    final = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert final["stateful_callbacks"]["canopy_monitor"]["steps"] == [0, 2, 4]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = checkpointed_trainer(tmp_path / "straight")
    monitored(straight)
    straight.train()

    interrupted = checkpointed_trainer(tmp_path / "resumed")
    interrupted.add_callback(StopAt(3))
    monitored(interrupted)
    interrupted.train()
    assert [record["step"] for record in read_history(tmp_path / "resumed")] == [0, 2, 3]

    resumed = checkpointed_trainer(tmp_path / "resumed")
    monitored(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))

    expected = read_history(tmp_path / "straight")
    history = read_history(tmp_path / "resumed")
    assert [record["step"] for record in history] == [0, 2, 4, 6]
    for before, after in zip(expected, history):
        assert_same_figures(figures(before), figures(after))


def test_lost_history_is_restored_from_checkpoint(tmp_path):
    first = checkpointed_trainer(tmp_path, max_steps=4)
    monitored(first)
    first.train()
    (tmp_path / "canopy_monitor" / "history.jsonl").unlink()

    resumed = checkpointed_trainer(tmp_path)
    monitored(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    assert [record["step"] for record in read_history(tmp_path)] == [0, 2, 4, 6]


def test_lost_point_is_reported_not_repeated(tmp_path, caplog):
    # Without the checkpoint's copy of the history, a point the checkpoint lists but
    # the history file lacks cannot be measured again: its weights are gone.
    first = checkpointed_trainer(tmp_path, max_steps=4)
    monitored(first)
    first.train()
    (tmp_path / "canopy_monitor" / "history.jsonl").unlink()
    (tmp_path / "checkpoint-2" / "canopy_monitor" / "history.jsonl").unlink()

    resumed = checkpointed_trainer(tmp_path)
    monitored(resumed)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    assert [record["step"] for record in read_history(tmp_path)] == [4, 6]
    assert "lists monitoring points at steps [0, 2] that are missing" in caplog.text


def test_error_count_continues_after_resume(tmp_path, monkeypatch, caplog):
    calls = {"count": 0}
    sample = callback_module.sample_rollouts

    def fail_second_point(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("simulated failure")
        return sample(*args, **kwargs)

    first = checkpointed_trainer(tmp_path, max_steps=4)
    monitored(first)
    with monkeypatch.context() as patch:
        patch.setattr(callback_module, "sample_rollouts", fail_second_point)
        first.train()

    resumed = checkpointed_trainer(tmp_path)
    callback = monitored(resumed)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    history = read_history(tmp_path)
    # The failed point at step 2 is not taken again, its error still counts, and it
    # is not reported as lost.
    assert "missing from" not in caplog.text
    assert [record["step"] for record in history] == [0, 4, 6]
    assert [record["metrics"]["canopy/monitor_errors"] for record in history] == [0, 1, 1]
    assert callback.num_errors == 1


def test_fixed_batch_size_survives_resume(tmp_path):
    first = checkpointed_trainer(tmp_path, max_steps=2)
    monitored(first, batch_size=5)
    first.train()

    resumed = checkpointed_trainer(tmp_path, max_steps=4)
    callback = monitored(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    assert callback.sampling.batch_size == 5
