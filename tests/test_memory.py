import pytest
import torch
from transformers import DynamicCache

from canopy_monitor.config import SamplingConfig
from canopy_monitor.sampling import memory

from conftest import make_model


def test_cache_bytes_per_position_match_a_real_cache(tiny_model):
    cache = DynamicCache(config=tiny_model.config)
    with torch.no_grad():
        tiny_model(input_ids=torch.ones(3, 5, dtype=torch.long), cache=cache, use_cache=True)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    assert memory.cache_bytes_per_position(tiny_model) == held // (3 * 5)


def test_half_precision_halves_the_cache(tiny_model):
    assert memory.cache_bytes_per_position(tiny_model.to(torch.bfloat16)) * 2 == memory.cache_bytes_per_position(
        make_model()
    )


@pytest.mark.parametrize(
    ("free", "expected"),
    [
        (None, 32),  # unreadable: the fallback
        (10**12, 64),  # plenty: the CPU ceiling
        (0, 8),  # nothing free: still one prompt
    ],
)
def test_rows_from_free_memory(tiny_model, monkeypatch, free, expected):
    monkeypatch.setattr(memory, "free_memory", lambda device: free)

    rows = memory.batch_rows(tiny_model, num_rollouts=8, prompt_width=10, max_new_tokens=20, device=torch.device("cpu"))

    assert rows == expected


def test_rows_fill_the_memory_share(tiny_model, monkeypatch):
    per_row = memory.cache_bytes_per_position(tiny_model) * (10 + 20) + 5 * 4 * tiny_model.config.vocab_size
    # Room for 27.5 rows in the share: 3 prompts of 8 rollouts.
    monkeypatch.setattr(memory, "free_memory", lambda device: int(27.5 * per_row / memory.MEMORY_SHARE))

    rows = memory.batch_rows(tiny_model, num_rollouts=8, prompt_width=10, max_new_tokens=20, device=torch.device("cpu"))

    assert rows == 24


def test_free_memory_of_the_cpu_is_positive():
    assert memory.free_memory(torch.device("cpu")) > 0


def test_batch_size_setting_is_checked():
    assert SamplingConfig().batch_size is None
    assert SamplingConfig(batch_size=5).batch_size == 5
    for bad in (0, -1, 2.5, True, "auto"):
        with pytest.raises(ValueError, match="batch_size must be a positive integer, or None"):
            SamplingConfig(batch_size=bad)
