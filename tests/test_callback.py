import json
import math
from pathlib import Path

import pytest
import torch

import canopy_monitor.callback as callback_module
from canopy_monitor import CanopyMonitorCallback
from canopy_monitor.prompts import PromptError

from conftest import make_model, make_tokenizer, toy_conversations
from wandb_records import config_items as wandb_config_items
from wandb_records import history_rows as wandb_history_rows

HELDOUT = [
    "what is the sum of two plus two ?",
    "tell me a story",
    "how do i write a python function",
    "hello world",
]
FIXED_METRICS = [
    "canopy/ce_star",
    "canopy/ce_star_se",
    "canopy/entropy_rate",
    "canopy/mean_length",
    "canopy/rho_length_rate",
    "canopy/truncation_rate",
]


def make_trainer(output_dir: Path, *, max_steps: int = 6, report_to="none", seed: int = 42, use_peft: bool = False):
    from trl import SFTConfig, SFTTrainer

    peft_config = None
    if use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,
        seed=seed,
        max_length=64,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return SFTTrainer(
        model=make_model(seed=0),
        args=args,
        train_dataset=toy_conversations(),
        processing_class=make_tokenizer(),
        peft_config=peft_config,
    )


def read_history(output_dir: Path) -> list[dict]:
    path = output_dir / "canopy_monitor" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def training_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_callback_in_sft_trainer_writes_history(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5)
    callback = CanopyMonitorCallback(trainer, prompts=HELDOUT, every_n_steps=2, num_rollouts=4, max_new_tokens=12)
    trainer.add_callback(callback)

    trainer.train()

    history = read_history(tmp_path)
    assert [record["step"] for record in history] == [0, 2, 4, 5]
    for record in history:
        for name in FIXED_METRICS:
            assert name in record["metrics"]
        assert record["num_prompts"] == 4
        assert record["metrics"]["canopy/ce_star"] > 0
        ce_star = record["metrics"]["canopy/ce_star"]
        parts = record["metrics"]["canopy/length_driven"] + record["metrics"]["canopy/conveyance"]
        assert parts == pytest.approx(ce_star, rel=1e-9)
    canopy_entries = [entry for entry in trainer.state.log_history if "canopy/ce_star" in entry]
    assert [entry["step"] for entry in canopy_entries] == [0, 2, 4, 5]
    # SFTTrainer's own accumulated metrics stay in its loss entries.
    assert not any("mean_token_accuracy" in entry for entry in canopy_entries)
    assert all("mean_token_accuracy" in entry for entry in trainer.state.log_history if "loss" in entry)
    assert trainer.model.training


def test_callback_with_lora_model(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, use_peft=True)
    trainer.add_callback(CanopyMonitorCallback(trainer, prompts=HELDOUT[:2], every_n_steps=1, num_rollouts=3, max_new_tokens=8))

    trainer.train()

    assert [record["step"] for record in read_history(tmp_path)] == [0, 1, 2]


def test_same_weights_same_figures(tmp_path):
    # With a learning rate of 0 the weights never change, so common random numbers make
    # every monitoring point identical.
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.args.learning_rate = 0.0
    trainer.add_callback(CanopyMonitorCallback(trainer, prompts=HELDOUT, every_n_steps=1, num_rollouts=4, max_new_tokens=10))

    trainer.train()

    history = read_history(tmp_path)
    assert len(history) == 3
    for record in history[1:]:
        assert record["metrics"]["canopy/ce_star"] == history[0]["metrics"]["canopy/ce_star"]
        assert record["metrics"]["canopy/mean_length"] == history[0]["metrics"]["canopy/mean_length"]


def test_training_losses_identical_with_and_without_monitor(tmp_path):
    plain = make_trainer(tmp_path / "plain", max_steps=6)
    plain.train()

    monitored = make_trainer(tmp_path / "monitored", max_steps=6)
    monitored.add_callback(CanopyMonitorCallback(monitored, prompts=HELDOUT, every_n_steps=2, num_rollouts=4, max_new_tokens=10))
    monitored.train()

    assert len(training_losses(plain)) == 6
    assert training_losses(monitored) == training_losses(plain)


def test_failure_inside_point_does_not_stop_training(tmp_path, caplog, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=3)
    callback = CanopyMonitorCallback(trainer, prompts=HELDOUT[:2], every_n_steps=1, num_rollouts=3, max_new_tokens=6)
    trainer.add_callback(callback)
    calls = {"count": 0}
    original = callback_module.sample_rollouts

    def flaky(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("simulated out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(callback_module, "sample_rollouts", flaky)

    with caplog.at_level("WARNING"):
        trainer.train()

    assert trainer.state.global_step == 3
    assert [record["step"] for record in read_history(tmp_path)] == [0, 2, 3]
    assert callback.num_errors == 1
    assert "simulated out of memory" in caplog.text
    assert trainer.model.training


def test_nan_logits_skip_point_and_training_goes_on(tmp_path, caplog):
    trainer = make_trainer(tmp_path, max_steps=4)
    callback = CanopyMonitorCallback(trainer, prompts=HELDOUT[:2], every_n_steps=2, num_rollouts=3, max_new_tokens=6)
    trainer.add_callback(callback)
    plain = make_trainer(tmp_path / "plain", max_steps=4)
    plain.train()

    def nan_when_sampling(module, inputs, outputs):
        # Sampling runs the model in eval mode, training in train mode.
        if not module.training:
            outputs.logits = torch.full_like(outputs.logits, float("nan"))
        return outputs

    trainer.model.register_forward_hook(nan_when_sampling)
    with caplog.at_level("WARNING"):
        trainer.train()

    assert trainer.state.global_step == 4
    assert callback.num_errors == 3
    assert caplog.text.count("FloatingPointError") == 1
    assert "next-token distribution is NaN" in caplog.text
    errors = [entry["canopy/monitor_errors"] for entry in trainer.state.log_history if "canopy/monitor_errors" in entry]
    assert errors == [1.0, 2.0, 3.0]
    assert training_losses(trainer) == training_losses(plain)


def test_strict_reraises(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=1)
    callback = CanopyMonitorCallback(trainer, prompts=HELDOUT[:1], num_rollouts=2, max_new_tokens=4, strict=True)
    trainer.add_callback(callback)
    monkeypatch.setattr(callback_module, "sample_rollouts", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom")))

    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()


def test_real_offline_wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "canopy-monitor-tests")
    trainer = make_trainer(tmp_path / "out", max_steps=3, report_to=["wandb"])
    trainer.add_callback(CanopyMonitorCallback(trainer, prompts=HELDOUT[:3], every_n_steps=2, num_rollouts=4, max_new_tokens=8))

    trainer.train()
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()

    run_files = list(run_dir.glob("*.wandb"))
    assert len(run_files) == 1
    history_rows = wandb_history_rows(run_files[0])

    ce_rows = [row for row in history_rows if "train/canopy/ce_star" in row]
    assert [int(float(row["train/global_step"])) for row in ce_rows] == [0, 2, 3]
    monitored = read_history(tmp_path / "out")
    for row, record in zip(ce_rows, monitored):
        assert float(row["train/canopy/ce_star"]) == pytest.approx(record["metrics"]["canopy/ce_star"])
        assert "train/canopy/rho_length_rate" in row
    table_rows = [row for row in history_rows if row.get("canopy/rollouts/_type") == '"table-file"']
    assert [int(float(row["train/global_step"])) for row in table_rows] == [0, 2, 3]
    # 3 prompts x 4 rollouts, all kept (the default keeps up to 4 per prompt).
    assert {row["canopy/rollouts/nrows"] for row in table_rows} == {"12"}
    # The scatter is stored as a table of all 12 (length, entropy rate) points.
    assert {row["canopy/length_vs_entropy_rate_table/nrows"] for row in table_rows} == {"12"}
    settings = json.loads(wandb_config_items(run_files[0])["canopy_monitor"])
    assert settings["units"] == "nats"
    assert settings["num_rollouts"] == 4
    assert settings["bootstrap"]["samples"] == 1000


def test_bad_inputs_raise_before_training(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)

    with pytest.raises(ValueError, match="num_rollouts"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, num_rollouts=1)
    with pytest.raises(PromptError, match="not found"):
        CanopyMonitorCallback(trainer, prompts=str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PromptError):
        CanopyMonitorCallback(trainer, prompts=str(empty))
    with pytest.raises(PromptError, match="context"):
        CanopyMonitorCallback(trainer, prompts=["hello " * 300], max_new_tokens=8)
    with pytest.raises(ValueError, match="every_n_steps"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, every_n_steps=0)


def test_callback_logs_intervals_length_views_and_change(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.add_callback(
        CanopyMonitorCallback(
            trainer, prompts=HELDOUT, every_n_steps=2, num_rollouts=4, max_new_tokens=20, bootstrap_samples=200
        )
    )

    trainer.train()

    first, second = read_history(tmp_path)
    metrics = first["metrics"]
    assert metrics["canopy/ce_star_ci_low"] <= metrics["canopy/ce_star_ci_high"]
    assert metrics["canopy/rho_length_rate_ci_low"] <= metrics["canopy/rho_length_rate_ci_high"]
    for name in (
        "canopy/entropy_rate_short",
        "canopy/entropy_rate_long",
        "canopy/mean_length_medium",
        "canopy/running_entropy_rate_16",
        "canopy/running_active_share_16",
        "canopy/completed/ce_star",
    ):
        assert name in metrics
    assert not any(name.startswith("canopy/change/") for name in metrics)
    assert first["units"] == "nats"
    assert len(first["prompts"]) == len(HELDOUT)
    for record in (first, second):
        assert 0 < record["metrics"]["canopy/monitor_time_share"] <= 1
        assert record["metrics"]["canopy/monitor_seconds"] > 0
    change = second["metrics"]["canopy/change/ce_star"]
    assert change == pytest.approx(second["metrics"]["canopy/ce_star"] - metrics["canopy/ce_star"], rel=1e-9)
    assert second["metrics"]["canopy/change/ce_star_ci_low"] <= second["metrics"]["canopy/change/ce_star_ci_high"]


def test_same_weights_same_intervals_and_zero_change(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.args.learning_rate = 0.0
    trainer.add_callback(
        CanopyMonitorCallback(trainer, prompts=HELDOUT, every_n_steps=1, num_rollouts=4, max_new_tokens=10, bootstrap_samples=100)
    )

    trainer.train()

    first, second = read_history(tmp_path)
    for name, value in first["metrics"].items():
        if name not in ("canopy/monitor_seconds", "canopy/monitor_time_share"):
            assert second["metrics"][name] == value, name
    assert second["metrics"]["canopy/change/ce_star"] == 0.0
    assert second["metrics"]["canopy/change/ce_star_ci_low"] == 0.0
    assert second["metrics"]["canopy/change/ce_star_ci_high"] == 0.0


def test_bits_are_nats_over_ln2(tmp_path):
    histories = {}
    for units in ("nats", "bits"):
        trainer = make_trainer(tmp_path / units, max_steps=1)
        trainer.add_callback(
            CanopyMonitorCallback(trainer, prompts=HELDOUT, every_n_steps=5, num_rollouts=4, max_new_tokens=10, units=units)
        )
        trainer.train()
        histories[units] = read_history(tmp_path / units)[0]

    nats = histories["nats"]["metrics"]
    bits = histories["bits"]["metrics"]
    assert histories["bits"]["units"] == "bits"
    assert bits["canopy/ce_star"] == pytest.approx(nats["canopy/ce_star"] / math.log(2))
    assert bits["canopy/entropy_rate_ci_high"] == pytest.approx(nats["canopy/entropy_rate_ci_high"] / math.log(2))
    assert bits["canopy/rho_length_rate"] == nats["canopy/rho_length_rate"]
    assert bits["canopy/branching_factor"] == nats["canopy/branching_factor"]
    prompt_bits = histories["bits"]["prompts"][0]["ce_star"]
    assert prompt_bits == pytest.approx(histories["nats"]["prompts"][0]["ce_star"] / math.log(2))


def test_truncation_warning_once_per_run(tmp_path, caplog):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.add_callback(
        CanopyMonitorCallback(trainer, prompts=HELDOUT[:2], every_n_steps=1, num_rollouts=3, max_new_tokens=3, truncation_warning=0.0)
    )

    with caplog.at_level("WARNING"):
        trainer.train()

    assert caplog.text.count("reached the length cap of 3 tokens") == 1


def test_resumed_run_keeps_first_point_as_baseline(tmp_path):
    first = make_trainer(tmp_path, max_steps=4)
    first.args.save_strategy = "steps"
    first.args.save_steps = 2
    first.add_callback(CanopyMonitorCallback(first, prompts=HELDOUT, every_n_steps=2, num_rollouts=4, max_new_tokens=8, units="bits"))
    first.train()

    resumed = make_trainer(tmp_path, max_steps=6)
    resumed.args.save_strategy = "steps"
    resumed.args.save_steps = 2
    resumed.add_callback(CanopyMonitorCallback(resumed, prompts=HELDOUT, every_n_steps=2, num_rollouts=4, max_new_tokens=8, units="bits"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    history = read_history(tmp_path)
    assert [record["step"] for record in history] == [0, 2, 4, 6]
    baseline = history[0]["metrics"]["canopy/ce_star"]
    for record in history[1:]:
        assert record["metrics"]["canopy/change/ce_star"] == pytest.approx(record["metrics"]["canopy/ce_star"] - baseline, rel=1e-9)


def test_bad_estimation_settings_raise_before_training(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)

    with pytest.raises(ValueError, match="units"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, units="shannons")
    with pytest.raises(ValueError, match="confidence"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, confidence=95)
    with pytest.raises(ValueError, match="samples"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, bootstrap_samples=-5)
    with pytest.raises(ValueError, match="positions"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, max_new_tokens=32, running_positions=[16, 64])
    with pytest.raises(ValueError, match="truncation"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, truncation_warning=1.5)
