"""`CanopyMonitorCallback` in `trl.SFTTrainer` and `transformers.Trainer` under unusual set-ups."""

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from canopy_monitor import CanopyMonitorCallback
from canopy_monitor.config import SamplingConfig
from canopy_monitor.prompts import load_prompts
from canopy_monitor.sampling import sample_rollouts
from canopy_monitor.sinks import HistoryWriter, read_history

from conftest import VOCAB_WORDS, make_model, make_tokenizer, toy_conversations

HELDOUT = ["what is the sum of two plus two ?", "tell me a story", "hello world"]
LOG_V = math.log(len(VOCAB_WORDS))


def sft_trainer(output_dir: Path, *, model=None, tokenizer=None, **overrides):
    from trl import SFTConfig, SFTTrainer

    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        max_length=64,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=False,
    )
    settings.update(overrides)
    return SFTTrainer(
        model=model if model is not None else make_model(seed=0),
        args=SFTConfig(**settings),
        train_dataset=toy_conversations(),
        processing_class=tokenizer if tokenizer is not None else make_tokenizer(),
    )


def history_steps(output_dir: Path) -> list[int]:
    return [record["step"] for record in read_history(Path(output_dir) / "canopy_monitor" / "history.jsonl")]


def monitor(trainer, **overrides):
    settings = dict(prompts=HELDOUT, every_n_steps=2, num_rollouts=3, max_new_tokens=6)
    settings.update(overrides)
    callback = CanopyMonitorCallback(trainer, **settings)
    trainer.add_callback(callback)
    return callback


def assert_valid_history(output_dir: Path, max_new_tokens: int):
    for record in read_history(Path(output_dir) / "canopy_monitor" / "history.jsonl"):
        metrics = record["metrics"]
        assert 0 <= metrics["canopy/ce_star"] <= max_new_tokens * LOG_V
        assert 0 <= metrics["canopy/entropy_rate"] <= LOG_V + 1e-6
        assert 1 <= metrics["canopy/mean_length"] <= max_new_tokens
        assert metrics["canopy/length_driven"] + metrics["canopy/conveyance"] == pytest.approx(
            metrics["canopy/ce_star"], rel=1e-9, abs=1e-12
        )


# Schedules


def test_every_n_steps_larger_than_max_steps(tmp_path):
    trainer = sft_trainer(tmp_path, max_steps=3)
    monitor(trainer, every_n_steps=100)

    trainer.train()

    assert history_steps(tmp_path) == [0, 3]


def test_gradient_accumulation_counts_optimiser_steps(tmp_path):
    trainer = sft_trainer(tmp_path, max_steps=4, gradient_accumulation_steps=3, per_device_train_batch_size=2)
    monitor(trainer, every_n_steps=2)

    trainer.train()

    assert trainer.state.global_step == 4
    assert history_steps(tmp_path) == [0, 2, 4]
    logged = [entry["step"] for entry in trainer.state.log_history if "canopy/ce_star" in entry]
    assert logged == [0, 2, 4]
    assert_valid_history(tmp_path, 6)


# Models and tokenizers


def test_bf16_model_gives_finite_float32_entropies(tmp_path):
    model = make_model().to(torch.bfloat16)
    trainer = sft_trainer(tmp_path, model=model, max_steps=2)
    callback = monitor(trainer, every_n_steps=1)

    trainer.train()

    assert history_steps(tmp_path) == [0, 1, 2]
    assert_valid_history(tmp_path, 6)
    rollouts = sample_rollouts(model, make_tokenizer(), callback.prompts, callback.sampling)
    for prompt_rollouts in rollouts:
        assert prompt_rollouts.step_entropies.dtype == torch.float32
        assert torch.isfinite(prompt_rollouts.step_entropies).all()
        assert prompt_rollouts.stats.entropy_sums.dtype == torch.float64


def test_several_eos_ids_in_generation_config(tmp_path):
    # "<end>" (3) ends rollouts as well as "</s>" (2).
    model = make_model(eos_token_id=[2, 3])
    tokenizer = make_tokenizer()
    config = SamplingConfig(num_rollouts=8, max_new_tokens=20, temperature=3.0)

    rollouts = sample_rollouts(model, tokenizer, load_prompts(HELDOUT), config)

    ended_by = set()
    for prompt_rollouts in rollouts:
        for ids, length, truncated in zip(prompt_rollouts.token_ids, prompt_rollouts.stats.lengths, prompt_rollouts.stats.truncated):
            assert len(ids) == int(length)
            ends = [i for i, token in enumerate(ids) if token in (2, 3)]
            assert bool(truncated) == (not ends)
            if ends:
                assert ends == [len(ids) - 1]
                ended_by.add(ids[-1])
    assert ended_by == {2, 3}


def test_generation_config_without_eos_uses_tokenizer_eos(tmp_path):
    model = make_model()
    model.generation_config.eos_token_id = None
    trainer = sft_trainer(tmp_path, model=model, max_steps=1)
    callback = monitor(trainer, every_n_steps=1, num_rollouts=8, max_new_tokens=20, temperature=3.0)

    trainer.train()

    assert callback.num_errors == 0
    assert history_steps(tmp_path) == [0, 1]


def test_no_end_of_sequence_anywhere_raises_in_constructor(tmp_path):
    # Without any end-of-sequence id every monitoring point fails; that is known before training.
    from transformers import Trainer, TrainingArguments

    model = make_model()
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    tokenizer = make_tokenizer()
    tokenizer.eos_token = None
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer)

    with pytest.raises(ValueError, match="end-of-sequence"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, num_rollouts=2, max_new_tokens=4)


@pytest.mark.parametrize(
    "setting",
    [{"eos_token_ids": ["</s>"]}, {"seed": 2**80}, {"seed": "0"}],
    ids=["eos-id-as-text", "seed-too-large", "seed-as-text"],
)
def test_setting_that_fails_every_point_raises_in_constructor(setting, tmp_path):
    # Each of these makes every monitoring point fail, so a whole run would end with no point
    # and a single warning. The constructor can detect them before training starts.
    trainer = sft_trainer(tmp_path, max_steps=1)

    try:
        callback = CanopyMonitorCallback(trainer, prompts=HELDOUT, num_rollouts=2, max_new_tokens=4, **setting)
    except (TypeError, ValueError):
        return
    trainer.add_callback(callback)
    trainer.train()
    assert callback.num_errors == 0, f"accepted {setting} in the constructor, then every point failed"


def test_tokenizer_without_pad_token_in_plain_trainer(tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    texts = [f"what is w{i % 20} ? w{i % 20} is the answer ." for i in range(16)]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(text)["input_ids"] for text in texts]})
    collator_tokenizer = make_tokenizer()  # the collator needs a pad token; the monitor's tokenizer has none
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1,
    )
    trainer = Trainer(
        model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(collator_tokenizer, mlm=False),
    )
    callback = monitor(trainer, every_n_steps=1)

    trainer.train()

    assert callback.num_errors == 0
    assert history_steps(tmp_path) == [0, 1, 2]
    assert tokenizer.pad_token is None
    assert tokenizer.padding_side == "right"


def test_missing_chat_template_uses_plain_text(tmp_path, caplog):
    tokenizer = make_tokenizer(chat_template=None)
    trainer = sft_trainer(tmp_path, max_steps=1, tokenizer=make_tokenizer())
    with caplog.at_level(logging.WARNING):
        callback = monitor(trainer, tokenizer=tokenizer, use_chat_template=True, every_n_steps=1)

    trainer.train()

    assert "no chat template" in caplog.text
    assert callback.num_errors == 0
    assert history_steps(tmp_path) == [0, 1]
    assert tokenizer.chat_template is None


def test_conversation_with_system_message_and_dataset_prompts(tmp_path):
    prompts = Dataset.from_dict(
        {
            "prompt": [
                [{"role": "system", "content": "answer ."}, {"role": "user", "content": "tell me a story"}],
                [{"role": "user", "content": "hello world"}],
            ],
            "other": [1, 2],
        }
    )
    trainer = sft_trainer(tmp_path, max_steps=1)
    callback = monitor(trainer, prompts=prompts, every_n_steps=1)

    trainer.train()

    assert [prompt.display for prompt in callback.prompts] == ["tell me a story", "hello world"]
    assert callback.prompts[0].messages[0]["role"] == "system"
    assert callback.num_errors == 0
    assert history_steps(tmp_path) == [0, 1]


@pytest.mark.parametrize(
    "field, value",
    [("return_dict_in_generate", True), ("stop_strings", ["w5"]), ("prompt_lookup_num_tokens", 3)],
)
def test_model_generation_defaults_do_not_break_sampling(field, value):
    # A checkpoint's generation config may set these. The sampler must not inherit them, just
    # as it does not inherit the model's top_k or temperature.
    model = make_model()
    setattr(model.generation_config, field, value)

    rollouts = sample_rollouts(model, make_tokenizer(), load_prompts(HELDOUT[:1]), SamplingConfig(num_rollouts=2, max_new_tokens=4))

    assert rollouts[0].stats.num_rollouts == 2


def test_submodule_training_modes_are_restored():
    # A model trained with a block kept in eval mode (so that its dropout stays off) must
    # come back exactly as it was, not with every module in train mode.
    model = make_model()
    model.train()
    model.model.layers[0].eval()
    modes_before = {name: module.training for name, module in model.named_modules()}

    sample_rollouts(model, make_tokenizer(), load_prompts(HELDOUT[:1]), SamplingConfig(num_rollouts=2, max_new_tokens=4))

    assert {name: module.training for name, module in model.named_modules()} == modes_before


# Resuming and reused output folders


def test_resume_from_checkpoint_no_duplicate_or_lost_steps(tmp_path):
    first = sft_trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    monitor(first, every_n_steps=2)
    first.train()
    assert history_steps(tmp_path) == [0, 2, 4, 6]

    resumed = sft_trainer(tmp_path, max_steps=8, save_strategy="steps", save_steps=2)
    callback = monitor(resumed, every_n_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))

    assert history_steps(tmp_path) == [0, 2, 4, 6, 8]
    # Steps after the checkpoint are repeated, so their points are measured again.
    assert [record["step"] for record in callback.history] == [6, 8]
    # A resumed run keeps its files in place: nothing is moved aside as an earlier run's.
    assert sorted(path.name for path in (tmp_path / "canopy_monitor").iterdir()) == [
        "history.jsonl",
        "rollouts",
        "run.json",
    ]


def test_resume_after_crash_fills_in_the_rest(tmp_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    first = sft_trainer(tmp_path, max_steps=8, save_strategy="steps", save_steps=2)
    monitor(first, every_n_steps=2)
    first.add_callback(Crash())
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert history_steps(tmp_path) == [0, 2, 4]

    resumed = sft_trainer(tmp_path, max_steps=8, save_strategy="steps", save_steps=2)
    monitor(resumed, every_n_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))

    assert history_steps(tmp_path) == [0, 2, 4, 6, 8]
    assert_valid_history(tmp_path, 6)


def test_resume_off_schedule_checkpoint_keeps_history_ordered(tmp_path):
    # The checkpoint (step 3) is not a monitoring step (every 2), and the crashed run had
    # already recorded step 4. The history must still read in step order.
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    first = sft_trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    monitor(first, every_n_steps=2)
    first.add_callback(Crash())
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert history_steps(tmp_path) == [0, 2, 4]

    resumed = sft_trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    monitor(resumed, every_n_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))

    steps = history_steps(tmp_path)
    assert {0, 2, 4, 6} <= set(steps)
    assert steps == sorted(set(steps))


def test_resume_after_history_line_cut_short(tmp_path):
    # A crash while a line was being written leaves it without its newline. The run that
    # resumes must still record its own points in readable lines.
    first = sft_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    monitor(first, every_n_steps=2)
    first.train()
    path = tmp_path / "canopy_monitor" / "history.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in lines] == [0, 2, 4]
    path.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # step 4 cut in the middle

    resumed = sft_trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    monitor(resumed, every_n_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))

    assert history_steps(tmp_path) == [0, 2, 4, 6]


def test_history_writer_after_partial_line(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 0, "metrics": {}}\n{"step": 2, "metr')

    HistoryWriter(path).append(step=4, metrics={"canopy/ce_star": 1.0})

    assert [record["step"] for record in read_history(path)] == [0, 4]


def test_reused_output_dir_keeps_every_earlier_history(tmp_path, monkeypatch):
    # Three fresh runs in one output folder within the same second (tiny models train that
    # fast): each earlier history must survive, none overwritten by the next.
    monkeypatch.setattr(time, "strftime", lambda *args: "20250101-000000")
    for max_steps in (1, 2, 3):
        trainer = sft_trainer(tmp_path, max_steps=max_steps)
        monitor(trainer, every_n_steps=100)
        trainer.train()

    folder = tmp_path / "canopy_monitor"
    kept = sorted(tuple(record["step"] for record in read_history(path)) for path in folder.glob("history*.jsonl"))
    assert kept == [(0, 1), (0, 2), (0, 3)]


def test_reused_output_dir_fresh_run_starts_new_history(tmp_path):
    for max_steps in (2, 1):
        trainer = sft_trainer(tmp_path, max_steps=max_steps)
        monitor(trainer, every_n_steps=1)
        trainer.train()
        time.sleep(1.1)  # distinct timestamps for the moved history

    assert history_steps(tmp_path) == [0, 1]
    moved = [path for path in (tmp_path / "canopy_monitor").glob("history.*.jsonl")]
    assert len(moved) == 1
    assert [record["step"] for record in read_history(moved[0])] == [0, 1, 2]


# Failure isolation


class FlakyPrefill:
    """Make the sampler's prompt prefill raise on the calls numbered in `failing` (1-based).

    With as many rows per batch as rollouts per prompt, each prompt is prefilled in a
    call of its own, so call `n` is the `n`-th prompt sampled.
    """

    def __init__(self, monkeypatch, failing):
        from canopy_monitor.sampling import decoder

        self.original = decoder._prefill
        self.failing = set(failing)
        self.calls = 0
        monkeypatch.setattr(decoder, "_prefill", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.failing:
            raise RuntimeError(f"simulated failure in prefill call {self.calls}")
        return self.original(*args, **kwargs)


def test_sampling_failures_are_isolated(tmp_path, caplog, monkeypatch):
    # 3 prompts, batch_size 3 with 3 rollouts: one prefill call per prompt, 3 per point.
    trainer = sft_trainer(tmp_path, max_steps=4)
    callback = monitor(trainer, every_n_steps=1, batch_size=3)
    # Points: step 0 -> calls 1-3, step 1 -> calls 4-5 (the 5th fails mid-point),
    # step 2 -> calls 6-7 (the 7th fails), step 3 -> calls 8-10, step 4 -> calls 11-13.
    flaky = FlakyPrefill(monkeypatch, failing={5, 7})

    with caplog.at_level(logging.WARNING, logger="canopy_monitor"):
        trainer.train()

    assert trainer.state.global_step == 4
    assert history_steps(tmp_path) == [0, 3, 4]
    assert callback.num_errors == 2
    warnings = [record for record in caplog.records if "failed and was skipped" in record.getMessage()]
    assert len(warnings) == 1
    assert "prefill call 5" in warnings[0].getMessage()
    assert trainer.model.training
    error_logs = [entry for entry in trainer.state.log_history if "canopy/monitor_errors" in entry]
    assert [entry["canopy/monitor_errors"] for entry in error_logs if "canopy/ce_star" not in entry] == [1.0, 2.0]
    assert len([entry for entry in trainer.state.log_history if "loss" in entry]) == 4
    assert flaky.calls == 13


def test_sampling_failure_mid_point_restores_global_state(tmp_path, monkeypatch):
    model = make_model()
    model.train()
    tokenizer = make_tokenizer()
    FlakyPrefill(monkeypatch, failing={2})
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token

    with pytest.raises(RuntimeError, match="prefill call 2"):
        sample_rollouts(model, tokenizer, load_prompts(HELDOUT), SamplingConfig(num_rollouts=2, max_new_tokens=4, batch_size=2))

    assert model.training
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert (tokenizer.padding_side, tokenizer.pad_token) == (padding_side, pad_token)


def test_strict_reraises_sampling_failure(tmp_path, monkeypatch):
    trainer = sft_trainer(tmp_path, max_steps=3)
    monitor(trainer, every_n_steps=1, strict=True, batch_size=3)
    FlakyPrefill(monkeypatch, failing={4})

    with pytest.raises(RuntimeError, match="prefill call 4"):
        trainer.train()

    assert history_steps(tmp_path) == [0]
    assert trainer.model.training


def test_losses_unchanged_when_sampling_fails(tmp_path, monkeypatch):
    plain = sft_trainer(tmp_path / "plain", max_steps=4)
    plain.train()

    monitored = sft_trainer(tmp_path / "monitored", max_steps=4)
    monitor(monitored, every_n_steps=1, batch_size=3)
    FlakyPrefill(monkeypatch, failing={2, 8})
    monitored.train()

    def losses(trainer):
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    assert losses(monitored) == losses(plain)
