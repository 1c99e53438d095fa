"""The monitor under `accelerate launch` with two CPU processes, against one process."""

import json
import math
import subprocess
from pathlib import Path

import pytest

from process_launch import launch

SCRIPT = Path(__file__).with_name("distributed_run.py")


def run(output_dir: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    result = launch(SCRIPT, output_dir, processes, *extra, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def history(output_dir: Path) -> list[dict]:
    path = output_dir / "canopy_monitor" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def keys(output_dir: Path, process: int) -> list[list[int]]:
    return json.loads((output_dir / f"keys-{process}.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one")
    run(output_dir, 1)
    return output_dir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("two")
    run(output_dir, 2)
    return output_dir


def test_prompts_split_across_processes(two_processes):
    assert keys(two_processes, 0) == [[0, 2, 4]] * 3
    assert keys(two_processes, 1) == [[1, 3]] * 3


def test_main_process_logs_each_point_once(two_processes):
    records = history(two_processes)
    logs = json.loads((two_processes / "canopy-logs.json").read_text())

    assert [record["step"] for record in records] == [0, 2, 4]
    assert [record["num_prompts"] for record in records] == [5, 5, 5]
    assert [record["total_rollouts"] for record in records] == [20, 20, 20]
    assert len(logs) == 3


def test_two_processes_give_one_process_figures(one_process, two_processes):
    single, split = history(one_process), history(two_processes)

    assert [record["step"] for record in single] == [record["step"] for record in split]
    for alone, shared in zip(single, split):
        for alone_prompt, shared_prompt in zip(alone["prompts"], shared["prompts"]):
            assert alone_prompt["prompt"] == shared_prompt["prompt"]
            assert alone_prompt["mean_length"] == shared_prompt["mean_length"]
            assert alone_prompt["truncation_rate"] == shared_prompt["truncation_rate"]
        for name, value in alone["metrics"].items():
            if name in ("canopy/monitor_seconds", "canopy/monitor_time_share"):
                continue
            other = shared["metrics"][name]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                assert other is None or math.isnan(other), name
            else:
                assert other == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_failure_on_one_process_skips_point_on_all(tmp_path):
    result = run(tmp_path, 2, "--fail-on-process", "1")

    records = history(tmp_path)
    logs = json.loads((tmp_path / "canopy-logs.json").read_text())
    assert [record["step"] for record in records] == [0, 4]
    assert records[-1]["metrics"]["canopy/monitor_errors"] == 1
    assert [entry["canopy/monitor_errors"] for entry in logs] == [0, 1, 1]
    assert "process 1: RuntimeError: simulated failure on process 1" in result.stderr
    # Both processes finished training and sampled at all three points.
    assert len(keys(tmp_path, 0)) == 3
    assert len(keys(tmp_path, 1)) == 3


def test_fsdp_with_several_processes_skips_points(tmp_path, monkeypatch, caplog):
    # FSDP cannot be run here, so the trainer claims it and a second process is
    # simulated: the gather returns this process's outcome and an empty share.
    import canopy_monitor.callback as callback_module
    from canopy_monitor import CanopyMonitorCallback
    from canopy_monitor.distributed import Processes

    from test_callback import HELDOUT, make_trainer

    from transformers import TrainerCallback

    class ClaimFsdp(TrainerCallback):
        # Set once the trainer has prepared the model, which it does without FSDP.
        def on_train_begin(self, args, state, control, **kwargs):
            trainer.is_fsdp_enabled = True

    monkeypatch.setattr(callback_module.Processes, "of", classmethod(lambda cls, trainer: Processes(count=2, index=0)))
    trainer = make_trainer(tmp_path, max_steps=2)
    callback = CanopyMonitorCallback(trainer, prompts=HELDOUT[:2], every_n_steps=1, num_rollouts=2, max_new_tokens=4)
    trainer.add_callback(ClaimFsdp())
    trainer.add_callback(callback)
    monkeypatch.setattr(callback_module, "gather_shares", lambda processes, outcome: [outcome, ("ok", [])])
    monkeypatch.setattr(callback_module, "broadcast_from_main", lambda processes, value: value)

    with caplog.at_level("WARNING"):
        trainer.train()

    assert trainer.state.global_step == 2
    assert callback.num_errors == 3
    assert caplog.text.count("not supported yet") == 1
    assert "process 0: NotImplementedError" in caplog.text


def test_one_process_trainer_under_launcher_warns(tmp_path, monkeypatch, caplog):
    from canopy_monitor import CanopyMonitorCallback

    from test_callback import HELDOUT, make_trainer

    trainer = make_trainer(tmp_path, max_steps=1)
    monkeypatch.setenv("WORLD_SIZE", "2")

    with caplog.at_level("WARNING"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT[:1], num_rollouts=2, max_new_tokens=4)

    assert "WORLD_SIZE is 2 but the trainer runs on one process" in caplog.text
    assert "use_cpu=True" in caplog.text
