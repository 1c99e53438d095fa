"""Train a tiny model with the monitor under `accelerate launch`, with failures and resumes on request.

Run by tests/adversarial/test_distributed_adversarial.py, alone or with two CPU processes:

    accelerate launch --multi_gpu --num_processes 2 tests/adversarial/distributed_adversarial_run.py OUTPUT_DIR \
        [--num-prompts 1] [--fail-on-process 1 --fail-in sample --fail-at-point 2] [--strict] \
        [--save-steps 2 --stop-at 3] [--resume-from CHECKPOINT] [--semantic] [--wandb]

The learning rate is 0, so every point's figures are the same whatever the number of
processes. Each process writes the prompt keys it sampled at each point to
`OUTPUT_DIR/keys-<process>.json`, and the main process writes the canopy entries of the
trainer's log to `OUTPUT_DIR/canopy-logs.json` and the training losses to
`OUTPUT_DIR/losses.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import canopy_monitor.callback as callback_module  # noqa: E402
from canopy_monitor import CanopyMonitorCallback  # noqa: E402

from conftest import make_model, make_tokenizer, toy_conversations  # noqa: E402

PROMPTS = [
    "what is the sum of two plus two ?",
    "hello world",
    "tell me a story",
    "how do i write a python function ?",
    "what is a list",
]


class StopAt(TrainerCallback):
    """Stop training after `step`, as a crash or a time limit would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--num-prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--fail-on-process", type=int, default=None)
    parser.add_argument("--fail-in", choices=["sample", "estimate"], default="sample")
    parser.add_argument("--fail-at-point", type=int, default=2, help="1-based index of the point that fails")
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--save-steps", type=int, default=None)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--semantic", action="store_true")
    parser.add_argument("--wandb", action="store_true")
    return parser.parse_args()


def install_failure(options: argparse.Namespace, process: int, keys_seen: list[list[int]]) -> None:
    """Wrap `sample_rollouts` to record keys, and make the requested call fail on the requested process."""
    real_sample = callback_module.sample_rollouts
    real_estimate = callback_module.estimate_rollouts
    estimates = []

    def recording_sample(*args, **kwargs):
        keys_seen.append(list(kwargs["prompt_keys"]))
        failing = options.fail_in == "sample" and options.fail_on_process == process
        if failing and len(keys_seen) == options.fail_at_point:
            raise RuntimeError(f"simulated sampling failure on process {process}")
        return real_sample(*args, **kwargs)

    def failing_estimate(*args, **kwargs):
        estimates.append(True)
        failing = options.fail_in == "estimate" and options.fail_on_process == process
        if failing and len(estimates) == options.fail_at_point:
            raise RuntimeError(f"simulated estimation failure on process {process}")
        return real_estimate(*args, **kwargs)

    callback_module.sample_rollouts = recording_sample
    callback_module.estimate_rollouts = failing_estimate


def main() -> None:
    options = parse_options()

    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        per_device_train_batch_size=2,
        learning_rate=0.0,
        logging_steps=1,
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        report_to=["wandb"] if options.wandb else [],
        run_name="canopy-two-processes",
        seed=42,
        max_length=64,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # float64 keeps the logits of one and two processes equal, as in tests/distributed_run.py.
    model = make_model(seed=0).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[2] += 0.3
    trainer = SFTTrainer(model=model, args=args, train_dataset=toy_conversations(), processing_class=make_tokenizer())
    settings = dict(every_n_steps=2, num_rollouts=4, max_new_tokens=8, bootstrap_samples=50, strict=options.strict)
    if options.semantic:
        settings["semantic_every_n_points"] = 1
    trainer.add_callback(CanopyMonitorCallback(trainer, prompts=PROMPTS[: options.num_prompts], **settings))
    if options.stop_at is not None:
        trainer.add_callback(StopAt(options.stop_at))

    process = trainer.accelerator.process_index
    keys_seen: list[list[int]] = []
    install_failure(options, process, keys_seen)
    trainer.train(resume_from_checkpoint=options.resume_from)

    Path(options.output_dir, f"keys-{process}.json").write_text(json.dumps(keys_seen))
    if trainer.accelerator.is_main_process:
        log_history = trainer.state.log_history
        canopy_logs = [entry for entry in log_history if any(key.startswith("canopy/") for key in entry)]
        losses = [entry["loss"] for entry in log_history if "loss" in entry]
        Path(options.output_dir, "canopy-logs.json").write_text(json.dumps(canopy_logs))
        Path(options.output_dir, "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
