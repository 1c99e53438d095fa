"""Attach canopy-monitor to your own TRL SFT run.

A minimal LoRA SFT of the bundled default model (SmolLM2-135M-Instruct) on a
handful of toy conversations, monitored on three held-out prompts. It takes a few
minutes on a laptop CPU:

    python examples/sft_with_monitor.py

Replace the model, the data set and the prompts with your own; the callback line
stays the same.
"""

import logging

import torch

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from canopy_monitor import CanopyMonitorCallback
from canopy_monitor.models import load_model_and_tokenizer

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")

capitals = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo"}
train_dataset = Dataset.from_list(
    [
        {
            "messages": [
                {"role": "user", "content": f"What is the capital of {country}?"},
                {"role": "assistant", "content": f"{capital}."},
            ]
        }
        for country, capital in capitals.items()
    ]
    * 8
)

trainer = SFTTrainer(
    model=model,
    args=SFTConfig(
        output_dir="runs/example",
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        bf16=torch.cuda.is_available(),  # TRL turns bf16 on by default, which a CPU cannot run
        report_to="none",  # or ["wandb"], ["tensorboard"], ...
    ),
    train_dataset=train_dataset,
    processing_class=tokenizer,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
)

trainer.add_callback(
    CanopyMonitorCallback(
        trainer,
        prompts=[
            "What is the capital of Italy?",
            "Name a large city in Canada.",
            [{"role": "user", "content": "Which country is Madrid in?"}],
        ],
        every_n_steps=5,
        num_rollouts=6,
        max_new_tokens=32,
    )
)
trainer.train()
# Figures per monitoring point: runs/example/canopy_monitor/history.jsonl
