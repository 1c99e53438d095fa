"""Tiny random models and an offline word-level tokenizer for fast tests."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The test models are tiny: with several intra-op threads on a busy machine, each
# operation waits for threads far longer than it computes.
torch.set_num_threads(1)

VOCAB_WORDS = ["<pad>", "<s>", "</s>", "<end>"] + [f"w{i}" for i in range(28)] + [
    "what", "is", "the", "a", "of", "to", "and", "in", "python", "list", "how", "do", "i", "write", "sum",
    "function", "answer", "user", "assistant", "system", "hello", "world", "two", "plus", "?", ":", "\n", ".",
    "tell", "me", "story",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} \n {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """Build a word-level fast tokenizer over `VOCAB_WORDS` (ids 0..V-1); `</s>` (2) is EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(VOCAB_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="w0"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_model(seed: int = 0, *, zero_weights: bool = False, eos_token_id=2, num_hidden_layers: int = 2):
    """Build a tiny random Llama over the test vocabulary.

    With `zero_weights`, every logit is 0, so the raw policy is uniform over the
    vocabulary at every step.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB_WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if zero_weights:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = 0
    return model


def toy_conversations(size: int = 32):
    """Build a chat data set in TRL's conversational format over the test vocabulary."""
    from datasets import Dataset

    rows = []
    for index in range(size):
        word = f"w{index % 20}"
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"what is {word} ?"},
                    {"role": "assistant", "content": f"{word} is the answer ."},
                ]
            }
        )
    return Dataset.from_list(rows)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture
def model_dir(tmp_path):
    """A tiny model and its tokenizer saved as a local model directory."""
    path = tmp_path / "tiny-model"
    make_model().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def fresh_wandb_settings():
    """Close any W&B run a test left open and reset W&B's process-wide settings.

    `wandb` reads settings such as `WANDB_DIR` once per process, so without the reset a
    later test's run would be written to an earlier test's folder.
    """
    yield
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()
