"""How many rollouts to sample together, from the memory a batch needs and the memory free."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# Share of the memory free when sampling starts that one batch may take. The rest
# stays with training (optimizer states, activations of the next step) and the allocator.
MEMORY_SHARE = 0.25

# Larger batches keep paying on an accelerator long after they stop paying on a CPU.
# NOTE: the CPU ceiling is from one 2-core x86 machine, where going from 32 to 64 rows
# gave 12% more tokens per second for twice the cache (docs/benchmarks.md).
MAX_ROWS = {"cpu": 64}
MAX_ROWS_ACCELERATOR = 1024

# Rows per batch when neither the cache size nor the free memory can be read.
FALLBACK_ROWS = 32

# Float32 copies of the scores `[rows, V]` alive at once in a decoding step: the
# logits, the processed scores, the log-probabilities, the probabilities and the
# entropy terms.
_SCORE_COPIES = 5


def cache_bytes_per_position(model) -> int | None:
    """Bytes of key-value cache one row needs per position, or `None` when the model's
    config does not say (`num_hidden_layers`, attention heads, head size)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden_size = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and all(isinstance(value, int) and value > 0 for value in (heads, hidden_size)):
        head_dim = hidden_size // heads
    if not all(isinstance(value, int) and value > 0 for value in (layers, kv_heads, head_dim)):
        return None
    parameter = next(model.parameters(), None)
    element_size = parameter.element_size() if parameter is not None and parameter.is_floating_point() else 4
    return 2 * layers * kv_heads * head_dim * element_size


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: the accelerator's free memory, or the system's available
    memory for a CPU; `None` when it cannot be read."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        if device.type == "cpu":
            import psutil

            return int(psutil.virtual_memory().available)
    except (ImportError, OSError, RuntimeError, AttributeError) as error:  # costs only the fallback batch size
        logger.debug("canopy-monitor could not read the free memory of %s: %s", device, error)
    return None


def batch_rows(model, *, num_rollouts: int, prompt_width: int, max_new_tokens: int, device: torch.device) -> int:
    """Choose how many rollouts to sample together.

    A row needs its key-value cache for `prompt_width + max_new_tokens` positions and
    a few float32 copies of the scores. A batch may take `MEMORY_SHARE` of the memory
    free now, and has at most `MAX_ROWS` rows for the device type (1024 on an
    accelerator). The result is a whole number of prompts, never below one prompt, so
    that the `generate` fallback batches the same rows.

    Returns:
        `int`: rows per batch, a multiple of `num_rollouts`.
    """
    per_position = cache_bytes_per_position(model)
    free = free_memory(device)
    vocabulary = getattr(getattr(model, "config", None), "vocab_size", None) or 0
    if per_position is None or free is None:
        rows = FALLBACK_ROWS
    else:
        per_row = per_position * (prompt_width + max_new_tokens) + _SCORE_COPIES * 4 * vocabulary
        rows = int(free * MEMORY_SHARE // max(per_row, 1))
    rows = min(rows, MAX_ROWS.get(device.type, MAX_ROWS_ACCELERATOR))
    return max(1, rows // num_rollouts) * num_rollouts
