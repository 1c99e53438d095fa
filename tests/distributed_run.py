"""Train a tiny model with the monitor attached, under `accelerate launch` or alone.

Run by tests/test_distributed.py, with two CPU processes:

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_run.py OUTPUT_DIR [--fail-on-process 1]

The learning rate is 0, so the weights, and with them every point's figures, do not
depend on how many processes train. Each process writes the prompt keys it sampled
at each point to `OUTPUT_DIR/keys-<process>.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--fail-on-process", type=int, default=None)
    options = parser.parse_args()

    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=options.output_dir,
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=42,
        max_length=64,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # In float64 a forward pass over a batch of another shape rounds the logits the
    # same way once they are cast to float32, so one and two processes compute the
    # same entropies. The sharper logits make the entropy rates differ between
    # rollouts, unlike the near-uniform random model.
    model = make_model(seed=0).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[2] += 0.3
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=toy_conversations(),
        processing_class=make_tokenizer(),
    )
    callback = CanopyMonitorCallback(
        trainer, prompts=PROMPTS, every_n_steps=2, num_rollouts=4, max_new_tokens=8, bootstrap_samples=50
    )
    trainer.add_callback(callback)

    process = trainer.accelerator.process_index
    keys_seen: list[list[int]] = []
    sample = callback_module.sample_rollouts

    def recording_sample(*args, **kwargs):
        keys_seen.append(list(kwargs["prompt_keys"]))
        if options.fail_on_process == process and len(keys_seen) == 2:
            raise RuntimeError(f"simulated failure on process {process}")
        return sample(*args, **kwargs)

    callback_module.sample_rollouts = recording_sample
    trainer.train()

    Path(options.output_dir, f"keys-{process}.json").write_text(json.dumps(keys_seen))
    if trainer.accelerator.is_main_process:
        canopy_logs = [entry for entry in trainer.state.log_history if any(key.startswith("canopy/") for key in entry)]
        Path(options.output_dir, "canopy-logs.json").write_text(json.dumps(canopy_logs))


if __name__ == "__main__":
    main()
