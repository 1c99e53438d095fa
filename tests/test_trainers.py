"""CanopyMonitorCallback in transformers' `Trainer` and in TRL's trainers, on a tiny random model.

Every trainer trains the same saved tiny Llama for `MAX_STEPS` steps on a tiny
in-memory data set, on the CPU. The monitor must record its points on schedule,
leave training unchanged, and record step entropies that match the model's own
logits, with LoRA, gradient checkpointing and half-precision weights too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

import canopy_monitor.callback as callback_module
from canopy_monitor import CanopyMonitorCallback
from canopy_monitor.prompts import encode_prompts, model_context_length

from conftest import make_model, make_tokenizer, toy_conversations

TRAINER_KINDS = ["trainer", "sft", "dpo", "grpo", "rloo", "kto"]
# "float32" is the reference set-up, and each other variant changes one thing.
VARIANTS = ["float32", "lora", "gradient_checkpointing", "bfloat16", "float16"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

MAX_STEPS = 5
EVERY_N_STEPS = 2
# Before the first step, every `EVERY_N_STEPS` steps, and at the end of training.
EXPECTED_STEPS = [0, 2, 4, 5]
HELDOUT = ["what is the sum of two plus two ?", "tell me a story", "how do i write a python function"]
NUM_ROLLOUTS = 4
MAX_NEW_TOKENS = 8

# The random model's logits are nearly uniform (entropy close to log V at every step).
# Scaling its output layer spreads them, so a wrong entropy cannot pass as log V.
LOGIT_SCALE = 30.0
# Largest absolute difference, in nats, between a recorded step entropy and the entropy
# of a teacher-forced forward pass of the same weights. The two passes differ only in
# rounding (one token at a time against a key-value cache, or the whole sequence at
# once), so the tolerance follows the precision of the weights' dtype. Over every
# trainer and variant here the largest differences were 1.6e-6 (float32), 0.044
# (bfloat16) and 0.006 (float16) nats, with torch 2.13 on a 2-core x86 CPU.
ENTROPY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.02}

# Log entries whose values are wall-clock times, which differ between any two runs.
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time"}


# Building the trainers


@pytest.fixture(scope="module")
def spread_model_dir(tmp_path_factory) -> Path:
    """Save the tiny model with a spread-out output layer, so that every trainer and
    every reference model TRL builds loads the same weights from this folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_model(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    # Attention dropout makes every training step draw from torch's global random
    # generator, so the invariance tests notice a monitor that consumes it. It stays on
    # in every trainer here: TRL's `disable_dropout` (trl 1.16) zeroes only `nn.Dropout`
    # modules, and Llama applies attention dropout as a function.
    model.config.attention_dropout = 0.1
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def reward_four_words(completions, **kwargs) -> list[float]:
    """Reward completions for being four words long: 0 for exactly four, minus the distance otherwise."""
    return [-abs(len(completion.split()) - 4.0) for completion in completions]


def causal_lm_dataset(tokenizer, size: int = 16) -> Dataset:
    """Build right-padded token ids with labels, -100 on the padding, for `Trainer`'s default collator."""
    texts = [f"what is w{i % 20} ? w{i % 20} is the answer ." for i in range(size)]
    sequences = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    width = max(len(ids) for ids in sequences)
    rows = []
    for ids in sequences:
        padding = width - len(ids)
        rows.append(
            {
                "input_ids": ids + [tokenizer.pad_token_id] * padding,
                "attention_mask": [1] * len(ids) + [0] * padding,
                "labels": ids + [-100] * padding,
            }
        )
    return Dataset.from_list(rows)


def preference_dataset(size: int = 16) -> Dataset:
    rows = []
    for i in range(size):
        rows.append({"prompt": f"what is w{i} ?", "chosen": f"w{i} is the answer .", "rejected": "hello world"})
    return Dataset.from_list(rows)


def unpaired_preference_dataset(size: int = 16) -> Dataset:
    rows = []
    for i in range(size):
        desirable = i % 2 == 0
        completion = f"w{i} is the answer ." if desirable else "hello world"
        rows.append({"prompt": f"what is w{i} ?", "completion": completion, "label": desirable})
    return Dataset.from_list(rows)


def prompt_dataset(size: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": f"what is w{i} ?"} for i in range(size)])


def build_trainer(kind: str, output_dir: Path, model_dir: Path, variant: str = "float32"):
    """Build a trainer of `kind` with one set-up change named by `variant`.

    The model is loaded from `model_dir`, so that the DPO, KTO and RLOO trainers build
    their reference models from the same folder, in the same dtype.
    """
    tokenizer = make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES.get(variant, torch.float32))
    peft_config = lora_config() if variant == "lora" else None
    arguments = {
        "output_dir": str(output_dir),
        "max_steps": MAX_STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": 42,
        "use_cpu": True,
        # TRL's configs turn both on by default, so each variant sets them itself.
        "bf16": False,
        "gradient_checkpointing": variant == "gradient_checkpointing",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    if variant == "float16":
        # AdamW's default epsilon of 1e-8 rounds to 0 in float16, so an update whose
        # second moment underflows to 0 divides by 0 and the weights turn NaN.
        arguments["adam_epsilon"] = 1e-4

    if kind == "trainer":
        from transformers import Trainer, TrainingArguments

        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        return Trainer(
            model=model,
            args=TrainingArguments(**arguments),
            train_dataset=causal_lm_dataset(tokenizer),
            processing_class=tokenizer,
        )
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(
            model=model,
            args=SFTConfig(**arguments, max_length=64),
            train_dataset=toy_conversations(16),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(
            model=model,
            args=DPOConfig(**arguments, max_length=64),
            train_dataset=preference_dataset(),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    if kind == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer(
            model=model,
            args=KTOConfig(**arguments, max_length=64),
            train_dataset=unpaired_preference_dataset(),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    if kind in ("grpo", "rloo"):
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        config_class, trainer_class = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
        return trainer_class(
            model=model,
            reward_funcs=reward_four_words,
            args=config_class(**arguments, num_generations=4, max_completion_length=8),
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    raise ValueError(f"unknown trainer kind {kind!r}. Expected one of {TRAINER_KINDS}.")


def attach_monitor(trainer, *, bootstrap_samples: int = 0, strict: bool = True) -> CanopyMonitorCallback:
    # strict=True re-raises a failed point with its traceback instead of logging it.
    callback = CanopyMonitorCallback(
        trainer,
        prompts=HELDOUT,
        every_n_steps=EVERY_N_STEPS,
        num_rollouts=NUM_ROLLOUTS,
        max_new_tokens=MAX_NEW_TOKENS,
        bootstrap_samples=bootstrap_samples,
        strict=strict,
    )
    trainer.add_callback(callback)
    return callback


def read_history(output_dir: Path) -> list[dict]:
    path = output_dir / "canopy_monitor" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def training_logs(trainer) -> list[dict]:
    """Return the trainer's own log entries, without the monitor's and without wall-clock times."""
    entries = []
    for entry in trainer.state.log_history:
        own = {key: value for key, value in entry.items() if not key.startswith("canopy/") and key not in TIMING_KEYS}
        if set(own) - {"step", "epoch"}:
            entries.append(own)
    return entries


# The model around a monitoring point


@dataclass
class ModelState:
    """The parts of a model's state that a monitoring point must leave as it found them."""

    training: dict[str, bool]
    use_cache: bool | None
    checkpointing: dict[str, tuple[bool, object]]
    generation_config: dict


def model_state(model) -> ModelState:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return ModelState(
        training={name: module.training for name, module in model.named_modules()},
        use_cache=base.config.use_cache,
        # Both the flag and the checkpoint function a layer would call.
        checkpointing={
            name: (module.gradient_checkpointing, getattr(module, "_gradient_checkpointing_func", None))
            for name, module in base.named_modules()
            if hasattr(module, "gradient_checkpointing")
        },
        generation_config=base.generation_config.to_dict(),
    )


class StateRecorder(TrainerCallback):
    """Callback that stores the model's state at every event that can hold a monitoring point.

    Added once before the monitor and once after it, so that the trainer calls the
    two around the monitor and their `states` compare the model before and after.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.states: list[tuple[str, int, ModelState]] = []  # (event, global step, state)

    def _record(self, event: str, state) -> None:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.states.append((event, state.global_step, model_state(model)))

    def on_train_begin(self, args, state, control, **kwargs):
        self._record("train_begin", state)

    def on_step_end(self, args, state, control, **kwargs):
        self._record("step_end", state)

    def on_train_end(self, args, state, control, **kwargs):
        self._record("train_end", state)


# Two classes, because the trainer warns when a callback class is added twice.
class StateBeforeMonitor(StateRecorder):
    pass


class StateAfterMonitor(StateRecorder):
    pass


@dataclass
class SampledPoint:
    """The rollouts of one monitoring point, and the entropies the same weights give when teacher-forced.

    Attributes:
        step (`int`): the global step of the point.
        dtype (`torch.dtype`): the dtype of the sampled model's weights.
        recorded (`list[torch.Tensor]`): per prompt, the recorded step entropies `[M, K]`.
        lengths (`list[list[int]]`): per prompt, each rollout's length `N`.
        teacher_forced (`list[list[torch.Tensor]]`): per prompt and rollout, the float32
            entropy `[N]` of the model's own logits over the rollout, fed in one pass.
    """

    step: int
    dtype: torch.dtype
    recorded: list[torch.Tensor]
    lengths: list[list[int]]
    teacher_forced: list[list[torch.Tensor]]


@torch.no_grad()
def teacher_forced_entropies(model, tokenizer, rollouts, config) -> list[list[torch.Tensor]]:
    """Feed each prompt with each of its rollouts through `model` in one pass and return
    the float32 entropy of the softmax of the logits that predict each rollout token."""
    training_modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        encoded = encode_prompts(
            tokenizer,
            [prompt_rollouts.prompt for prompt_rollouts in rollouts],
            use_chat_template=config.use_chat_template,
            max_new_tokens=config.max_new_tokens,
            context_length=model_context_length(model),
        )
        entropies = []
        for prompt_ids, prompt_rollouts in zip(encoded, rollouts):
            per_rollout = []
            for token_ids in prompt_rollouts.token_ids:
                input_ids = torch.tensor([list(prompt_ids) + token_ids])  # [1, W + N]
                logits = model(input_ids=input_ids, use_cache=False).logits[0]  # [W + N, V]
                predicting = logits[len(prompt_ids) - 1 : -1].float()  # [N, V]
                probabilities = torch.softmax(predicting, dim=-1)
                per_rollout.append(torch.special.entr(probabilities).sum(dim=-1))  # [N]
            entropies.append(per_rollout)
        return entropies
    finally:
        for module, training in training_modes.items():
            module.training = training


def record_sampled_points(monkeypatch, trainer) -> list[SampledPoint]:
    """Wrap the monitor's sampling so that each point also stores a `SampledPoint`.

    The teacher-forced pass runs right after sampling, with the weights sampled from,
    and restores the training mode of every module it changes.
    """
    points: list[SampledPoint] = []
    sample_rollouts = callback_module.sample_rollouts

    def sample_and_record(model, tokenizer, prompts, config, **options):
        rollouts = sample_rollouts(model, tokenizer, prompts, config, **options)
        points.append(
            SampledPoint(
                step=trainer.state.global_step,
                dtype=next(model.parameters()).dtype,
                recorded=[prompt_rollouts.step_entropies for prompt_rollouts in rollouts],
                lengths=[prompt_rollouts.stats.lengths.tolist() for prompt_rollouts in rollouts],
                teacher_forced=teacher_forced_entropies(model, tokenizer, rollouts, config),
            )
        )
        return rollouts

    monkeypatch.setattr(callback_module, "sample_rollouts", sample_and_record)
    return points


# Schedule and invariance: one run without the monitor and one with it, per trainer


@dataclass
class PairedRuns:
    kind: str
    plain: object
    monitored: object
    monitored_dir: Path


@pytest.fixture(scope="module", params=TRAINER_KINDS)
def paired_runs(request, spread_model_dir, tmp_path_factory) -> PairedRuns:
    kind = request.param
    root = tmp_path_factory.mktemp(f"runs-{kind}")

    plain = build_trainer(kind, root / "plain", spread_model_dir)
    plain.train()

    monitored = build_trainer(kind, root / "monitored", spread_model_dir)
    attach_monitor(monitored, bootstrap_samples=20)
    monitored.train()

    return PairedRuns(kind=kind, plain=plain, monitored=monitored, monitored_dir=root / "monitored")


def test_points_recorded_on_schedule(paired_runs):
    history = read_history(paired_runs.monitored_dir)

    assert [record["step"] for record in history] == EXPECTED_STEPS
    for record in history:
        metrics = record["metrics"]
        assert math.isfinite(metrics["canopy/ce_star"]), record["step"]
        assert metrics["canopy/ce_star"] > 0, record["step"]
        assert math.isfinite(metrics["canopy/entropy_rate"]), record["step"]
        assert metrics["canopy/entropy_rate"] > 0, record["step"]
        assert metrics["canopy/ce_star_ci_low"] <= metrics["canopy/ce_star_ci_high"], record["step"]
        assert metrics["canopy/monitor_errors"] == 0, record["step"]
        assert record["num_prompts"] == len(HELDOUT)
        assert record["total_rollouts"] == len(HELDOUT) * NUM_ROLLOUTS


def test_points_logged_through_trainer(paired_runs):
    history = read_history(paired_runs.monitored_dir)
    logged = [entry for entry in paired_runs.monitored.state.log_history if "canopy/ce_star" in entry]

    assert [entry["step"] for entry in logged] == EXPECTED_STEPS
    for entry, record in zip(logged, history):
        assert entry["canopy/ce_star"] == record["metrics"]["canopy/ce_star"]
        assert entry["canopy/entropy_rate"] == record["metrics"]["canopy/entropy_rate"]
    # The monitor's scalars are logged as entries of their own, apart from the training losses.
    assert not any("loss" in entry for entry in logged)


def test_training_logs_identical_with_monitor(paired_runs):
    plain = training_logs(paired_runs.plain)
    monitored = training_logs(paired_runs.monitored)

    losses = [entry["loss"] for entry in plain if "loss" in entry]
    assert len(losses) == MAX_STEPS
    assert [entry["loss"] for entry in monitored if "loss" in entry] == losses
    # Every other logged figure too: rewards, margins, KL, log-probabilities, lengths.
    assert len(monitored) == len(plain)
    for plain_entry, monitored_entry in zip(plain, monitored):
        assert monitored_entry == plain_entry


# Set-ups: LoRA, gradient checkpointing, half-precision weights


VARIANT_RUNS = [pytest.param((kind, variant), id=f"{kind}-{variant}") for kind in TRAINER_KINDS for variant in VARIANTS]


@dataclass
class VariantRun:
    """A monitored run of one trainer kind in one variant.

    Attributes:
        variant (`str`): one of `VARIANTS`.
        trainer: the trainer, after training.
        points (`list[SampledPoint]`): what each monitoring point sampled.
        before, after (`StateRecorder`): the model's state just before and just after
            the monitor handled each trainer event.
        history (`list[dict]`): the monitor's history file.
    """

    variant: str
    trainer: object
    points: list[SampledPoint]
    before: StateRecorder
    after: StateRecorder
    history: list[dict]


@pytest.fixture(scope="module", params=VARIANT_RUNS)
def variant_run(request, spread_model_dir, tmp_path_factory) -> VariantRun:
    """Train one trainer kind in one variant with the monitor attached and observed."""
    kind, variant = request.param
    output_dir = tmp_path_factory.mktemp(f"{kind}-{variant}")
    trainer = build_trainer(kind, output_dir, spread_model_dir, variant)
    before = StateBeforeMonitor(trainer)
    after = StateAfterMonitor(trainer)
    # The trainer calls its callbacks in the order they were added.
    trainer.add_callback(before)
    attach_monitor(trainer)
    trainer.add_callback(after)

    with pytest.MonkeyPatch.context() as monkeypatch:
        points = record_sampled_points(monkeypatch, trainer)
        trainer.train()

    return VariantRun(variant, trainer, points, before, after, read_history(output_dir))


def test_variant_records_finite_points(variant_run):
    history = variant_run.history

    assert variant_run.trainer.state.global_step == MAX_STEPS
    assert [record["step"] for record in history] == EXPECTED_STEPS
    assert [point.step for point in variant_run.points] == EXPECTED_STEPS
    for record in history:
        metrics = record["metrics"]
        assert math.isfinite(metrics["canopy/ce_star"]), record["step"]
        assert metrics["canopy/ce_star"] > 0, record["step"]
        assert math.isfinite(metrics["canopy/entropy_rate"]), record["step"]
        assert metrics["canopy/entropy_rate"] > 0, record["step"]
        assert metrics["canopy/monitor_errors"] == 0, record["step"]


def test_variant_in_place_while_sampling(variant_run):
    variant = variant_run.variant
    _, _, state = variant_run.before.states[0]
    checkpointed = [enabled for enabled, _ in state.checkpointing.values()]

    assert variant_run.points[0].dtype == DTYPES.get(variant, torch.float32)
    assert any("lora_A" in name for name in state.training) == (variant == "lora")
    assert any(checkpointed) == (variant == "gradient_checkpointing")


def test_variant_step_entropies_match_logits(variant_run):
    for point in variant_run.points:
        tolerance = ENTROPY_TOLERANCE[point.dtype]
        for recorded, lengths, teacher_forced in zip(point.recorded, point.lengths, point.teacher_forced):
            assert recorded.dtype == torch.float32
            assert recorded.shape[0] == NUM_ROLLOUTS
            for row, (length, expected) in enumerate(zip(lengths, teacher_forced)):
                assert expected.shape == (length,)
                difference = (recorded[row, :length] - expected).abs().max().item()
                where = f"step {point.step}, rollout {row}"
                assert difference <= tolerance, f"{where}: differs by {difference:.3g} nats"
                assert torch.all(recorded[row, length:] == 0), f"{where}: nonzero entropy after its end"

    # The entropies spread far beyond the tolerance, so a wrong value cannot pass for a close one.
    first = variant_run.points[0]
    entropies = torch.cat([rollout for prompt in first.teacher_forced for rollout in prompt])
    assert (entropies.max() - entropies.min()).item() > 10 * ENTROPY_TOLERANCE[first.dtype]


def test_variant_model_state_restored(variant_run):
    before, after = variant_run.before.states, variant_run.after.states

    assert [(event, step) for event, step, _ in before] == [(event, step) for event, step, _ in after]
    assert {step for _, step, _ in before} >= set(EXPECTED_STEPS)
    for (event, step, expected), (_, _, state) in zip(before, after):
        assert state.training == expected.training, f"{event} at step {step}"
        assert state.use_cache == expected.use_cache, f"{event} at step {step}"
        assert state.checkpointing == expected.checkpointing, f"{event} at step {step}"
        assert state.generation_config == expected.generation_config, f"{event} at step {step}"
    # The monitor switches the model to evaluation mode to sample, so the restore is
    # only tested where the model was training.
    assert all(state.training[""] for event, _, state in before if event == "step_end")


# Weights that training turned into NaN


def test_diverged_weights_skip_points(spread_model_dir, tmp_path, caplog):
    # AdamW's default epsilon of 1e-8 rounds to 0 in float16, so these weights turn NaN
    # within the run. The monitor is not strict: it must skip the points it cannot take.
    trainer = build_trainer("trainer", tmp_path, spread_model_dir, "float16")
    trainer.args.adam_epsilon = 1e-8
    callback = attach_monitor(trainer, strict=False)

    with caplog.at_level("WARNING", logger="canopy_monitor"):
        trainer.train()

    model = trainer.accelerator.unwrap_model(trainer.model)
    recorded_steps = [record["step"] for record in read_history(tmp_path)]
    failures = [record.getMessage() for record in caplog.records if "failed and was skipped" in record.getMessage()]
    assert any(torch.isnan(parameter).any() for parameter in model.parameters())
    assert trainer.state.global_step == MAX_STEPS
    assert recorded_steps[0] == 0
    assert MAX_STEPS not in recorded_steps
    assert callback.num_errors == len(EXPECTED_STEPS) - len(recorded_steps)
    # One warning per cause, and it names the cause.
    assert len(failures) == 1
    assert "NaN" in failures[0]
