"""Per-rollout records kept on disk for the offline report: contents, bound, resume and reuse."""

import json

import pytest

from canopy_monitor import CanopyMonitorCallback
from canopy_monitor.sinks.rollout_records import RolloutRecords, check_keep_points, read_rollout_records

from test_callback import HELDOUT, make_trainer, read_history
from test_resume import StopAt, checkpointed_trainer

SETTINGS = dict(prompts=HELDOUT[:3], every_n_steps=2, num_rollouts=4, max_new_tokens=8, bootstrap_samples=0)


def records_dir(output_dir):
    return output_dir / "canopy_monitor" / "rollouts"


def test_records_match_history(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.add_callback(CanopyMonitorCallback(trainer, **SETTINGS, max_table_rollouts_per_prompt=2))
    trainer.train()

    history = read_history(tmp_path)
    records = read_rollout_records(records_dir(tmp_path))

    assert [record["step"] for record in records] == [0, 2]
    for point, record in zip(history, records):
        assert record["units"] == "nats"
        assert record["max_new_tokens"] == 8
        assert len(record["prompts"]) == 3
        for prompt, figures in zip(record["prompts"], point["prompts"]):
            assert prompt["prompt"] == figures["prompt"]
            assert len(prompt["lengths"]) == 4
            assert len(prompt["texts"]) == 2
            assert sum(prompt["lengths"]) / 4 == pytest.approx(figures["mean_length"])
            assert sum(prompt["entropy_sums"]) / 4 == pytest.approx(figures["ce_star"])
            assert sum(prompt["truncated"]) / 4 == pytest.approx(figures["truncation_rate"])
            for length, total, rate in zip(prompt["lengths"], prompt["entropy_sums"], prompt["entropy_rates"]):
                assert rate == pytest.approx(total / length)
            assert prompt["diversity"] is None


def test_records_in_bits(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.add_callback(CanopyMonitorCallback(trainer, **SETTINGS, units="bits"))
    trainer.train()

    history = read_history(tmp_path)
    record = read_rollout_records(records_dir(tmp_path))[0]

    assert record["units"] == "bits"
    first = record["prompts"][0]
    assert sum(first["entropy_sums"]) / 4 == pytest.approx(history[0]["prompts"][0]["ce_star"])


def test_only_first_and_latest_points_kept(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10)
    trainer.add_callback(CanopyMonitorCallback(trainer, **{**SETTINGS, "every_n_steps": 1}, rollout_record_points=3))
    trainer.train()

    assert [record["step"] for record in read_history(tmp_path)] == list(range(11))
    assert RolloutRecords(records_dir(tmp_path)).steps() == [0, 9, 10]
    assert not list(records_dir(tmp_path).glob("*.tmp"))


def test_zero_points_writes_no_records(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.add_callback(CanopyMonitorCallback(trainer, **SETTINGS, rollout_record_points=0))
    trainer.train()

    assert not records_dir(tmp_path).exists()
    assert len(read_history(tmp_path)) == 2


def test_resume_drops_later_records(tmp_path):
    interrupted = checkpointed_trainer(tmp_path)
    interrupted.add_callback(StopAt(3))
    interrupted.add_callback(CanopyMonitorCallback(interrupted, **SETTINGS))
    interrupted.train()
    assert RolloutRecords(records_dir(tmp_path)).steps() == [0, 2, 3]
    stale = json.loads((records_dir(tmp_path) / "step-00000003.json").read_text())

    resumed = checkpointed_trainer(tmp_path)
    resumed.add_callback(CanopyMonitorCallback(resumed, **SETTINGS))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    assert RolloutRecords(records_dir(tmp_path)).steps() == [0, 2, 4, 6]
    assert stale["step"] == 3


def test_fresh_run_moves_earlier_records(tmp_path):
    for _ in range(2):
        trainer = make_trainer(tmp_path, max_steps=2)
        trainer.add_callback(CanopyMonitorCallback(trainer, **SETTINGS))
        trainer.train()

    moved = [path for path in (tmp_path / "canopy_monitor").iterdir() if path.name.startswith("rollouts.")]
    assert len(moved) == 1
    assert RolloutRecords(moved[0]).steps() == [0, 2]
    assert RolloutRecords(records_dir(tmp_path)).steps() == [0, 2]


def test_run_info_names_model_and_settings(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.add_callback(CanopyMonitorCallback(trainer, **SETTINGS, alert_ce_star_change=5.0))
    trainer.train()

    info = json.loads((tmp_path / "canopy_monitor" / "run.json").read_text())

    assert info["trainer"] == "SFTTrainer"
    assert info["max_steps"] == 2
    assert info["started_at_step"] == 0
    assert info["monitor"]["num_rollouts"] == 4
    assert info["monitor"]["rollout_record_points"] == 5
    assert info["monitor"]["alert_ce_star_change"] == 5.0


def test_reader_skips_unreadable_files(tmp_path):
    directory = tmp_path / "rollouts"
    directory.mkdir()
    (directory / "step-00000000.json").write_text('{"step": 0, "prompts": [{"entropy_rates": [1.0, null]}]}')
    (directory / "step-00000002.json").write_text('{"step": 2, "prom')
    (directory / "step-00000004.json").write_text("[1, 2]")
    (directory / "notes.json").write_text("{}")

    records = read_rollout_records(directory)

    assert [record["step"] for record in records] == [0]
    rates = records[0]["prompts"][0]["entropy_rates"]
    assert rates[0] == 1.0
    assert rates[1] != rates[1]  # NaN


@pytest.mark.parametrize("value", [1, -1, 2.0, True, None])
def test_keep_points_rejects_invalid(value):
    with pytest.raises(ValueError, match="rollout_record_points"):
        check_keep_points(value)


def test_keep_points_accepts_zero_and_two():
    assert check_keep_points(0) == 0
    assert check_keep_points(2) == 2
