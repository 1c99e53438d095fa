"""Turn a model, a tokenizer and prompts into per-rollout figures with `generate`."""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..config import SamplingConfig
from ..estimators import RolloutStats, summarize_rollouts
from ..prompts import Prompt, encode_prompts, model_context_length
from .recorder import StepEntropyRecorder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptRollouts:
    """The `M` rollouts of one prompt.

    Attributes:
        prompt (`Prompt`): the prompt as given.
        texts (`list[str]`): decoded rollouts, special tokens removed.
        token_ids (`list[list[int]]`): generated ids of each rollout, its end-of-sequence
            token included, nothing after it.
        stats (`RolloutStats`): per-rollout length, entropy sum, surprisal sum, truncation.
        step_entropies (`torch.Tensor` of shape `[M, K]`, float32, on CPU): `h_t` per
            position, 0 at and after each rollout's end; `K <= max_new_tokens`.
    """

    prompt: Prompt
    texts: list[str]
    token_ids: list[list[int]]
    stats: RolloutStats
    step_entropies: torch.Tensor


def resolve_eos_token_ids(model, tokenizer, extra: Sequence[int] | None = None) -> list[int]:
    """Collect every end-of-sequence id: the generation config's (an int or a list),
    the tokenizer's, and `extra`.

    Raises:
        `ValueError`: an id in `extra` is not a non-negative integer, or there is no id at all.
    """
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured is not None:
        ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for token_id in extra or ():
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"eos_token_ids must be non-negative integer token ids, got {token_id!r}.")
        ids.append(token_id)
    unique = sorted(set(ids))
    if not unique:
        raise ValueError(
            "the model and tokenizer define no end-of-sequence token, so no rollout could end before the "
            "length cap; set generation_config.eos_token_id or pass eos_token_ids"
        )
    return unique


def build_warpers(config: SamplingConfig) -> LogitsProcessorList:
    """Build the temperature, top-k and top-p warpers of the decoding policy, in the
    order `generate` applies them."""
    warpers = LogitsProcessorList()
    if config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    return warpers


def _generation_config(config: SamplingConfig, eos_token_ids: list[int], pad_token_id: int) -> GenerationConfig:
    # The warpers are passed as custom processors so that the recorder can follow
    # them. `generate` would otherwise append its own warpers after every custom
    # processor, so each one is set to its neutral value here. Explicit values also
    # keep the model's own generation defaults (top_k=50 for many models, a
    # temperature, a min_p) from changing the policy; min_p=0.0 is a no-op.
    # `typical_p`, `epsilon_cutoff` and `eta_cutoff` from the model's generation
    # config are neutralised the same way.
    # NOTE: a `top_h` or a watermarking config in the model's generation config would
    # still act after the recorder, so the recorded entropies would not match the policy.
    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        max_new_tokens=config.max_new_tokens,
        num_return_sequences=config.num_rollouts,
        eos_token_id=eos_token_ids,
        pad_token_id=pad_token_id,
        use_cache=True,
    )


# Fields of the model's own generation config that shape the distribution before the
# warpers (penalties, banned and forced tokens). They stay part of the decoding policy.
# Every other field (stop strings, assisted decoding, output options) is dropped while
# the monitor samples, because it would change what `generate` returns or how it runs.
_POLICY_FIELDS = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "min_length",
    "min_new_tokens",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "bos_token_id",
    "decoder_start_token_id",
)


@contextlib.contextmanager
def policy_generation_defaults(model) -> Iterator[None]:
    """Reduce the model's generation config to the fields of `_POLICY_FIELDS` while
    sampling, and put the original back afterwards.

    `generate` fills every field that the passed config leaves unset from
    `model.generation_config`, so a model that ships, say, `stop_strings` or
    `return_dict_in_generate=True` would otherwise break sampling.
    """
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(owner, "generation_config", None)
    if original is None:
        yield
        return
    policy_values = {
        name: getattr(original, name) for name in _POLICY_FIELDS if getattr(original, name, None) is not None
    }
    owner.generation_config = GenerationConfig(**policy_values)
    try:
        yield
    finally:
        owner.generation_config = original


@contextlib.contextmanager
def preserved_state(model, seed: int) -> Iterator[None]:
    """Seed a private random stream for sampling and restore everything afterwards.

    Torch's CPU and CUDA generators are forked (`torch.random.fork_rng`), so
    `generate`'s `torch.multinomial` draws from a stream seeded with `seed` and the
    global state is put back on exit. Python's and NumPy's global states are saved
    and restored too, as are the training modes of the model and of each submodule.
    """
    training_modes = {module: module.training for module in model.modules()}
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    device = _model_device(model)
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices.append(device.index if device.index is not None else torch.cuda.current_device())
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            # Not `torch.manual_seed`, which would also reseed CUDA devices that
            # fork_rng does not restore.
            torch.random.default_generator.manual_seed(seed)
            for index in cuda_devices:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
            model.eval()
            yield
    finally:
        for module, training in training_modes.items():
            module.training = training
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # [P, W]
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [P, W]
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def rollout_lengths(generated: torch.Tensor, eos_token_ids: Sequence[int], max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Find each row's length and truncation flag from its generated tokens.

    Args:
        generated (`torch.Tensor` of shape `[B, K]`): tokens after the prompt.
        eos_token_ids: every id that ends a rollout.
        max_new_tokens: the cap `T`.

    Returns:
        `(lengths [B], truncated [B])`. A row ends at its first end-of-sequence token,
        which counts in its length; a row with none is truncated at `T`.
    """
    is_end = torch.isin(generated, torch.tensor(list(eos_token_ids), device=generated.device))  # [B, K]
    has_end = is_end.any(dim=1)  # [B]
    first_end = is_end.to(torch.int64).argmax(dim=1)  # [B], 0 where there is no end
    lengths = torch.where(has_end, first_end + 1, torch.full_like(first_end, max_new_tokens))
    if bool((~has_end & (generated.shape[1] < max_new_tokens)).any()):
        raise RuntimeError(
            "generation stopped before the length cap on a row without an end-of-sequence token; "
            "a stopping criterion other than the cap and the end-of-sequence ids is active"
        )
    return lengths, ~has_end


@torch.no_grad()
def sample_rollouts(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    config: SamplingConfig,
    *,
    eos_token_ids: Sequence[int] | None = None,
    show_progress: bool = False,
) -> list[PromptRollouts]:
    """Sample `config.num_rollouts` rollouts per prompt and record their figures.

    Prompts are encoded (with the chat template unless `config.use_chat_template` is
    false), sorted by length so that batches need little padding, left-padded by
    hand (the tokenizer is never modified) and generated in batches of at most
    `config.batch_size` rollouts. Step entropies are of the decoding policy that is
    sampled from, computed at each step. The model's training mode and every global
    random state are as before when this returns.

    Args:
        model: a causal LM with `generate` (a PEFT model works).
        tokenizer: its tokenizer.
        prompts (sequence of `Prompt`): the prompts, in the order results are returned.
        config (`SamplingConfig`): decoding policy and budget.
        eos_token_ids (sequence of `int`, *optional*): end-of-sequence ids added to
            those of the generation config and the tokenizer.
        show_progress (`bool`, *optional*, defaults to `False`): show a progress bar.

    Returns:
        `list[PromptRollouts]`, one per prompt, in the order of `prompts`.
    """

    eos_ids = resolve_eos_token_ids(model, tokenizer, eos_token_ids)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    encoded = encode_prompts(
        tokenizer,
        prompts,
        use_chat_template=config.use_chat_template,
        max_new_tokens=config.max_new_tokens,
        context_length=model_context_length(model),
    )
    generation_config = _generation_config(config, eos_ids, pad_token_id)
    warpers = build_warpers(config)
    prompts_per_batch = max(1, config.batch_size // config.num_rollouts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    batches = [order[start : start + prompts_per_batch] for start in range(0, len(order), prompts_per_batch)]
    device = _model_device(model)
    results: dict[int, PromptRollouts] = {}

    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(prompts), desc="canopy-monitor sampling", unit="prompt", leave=False)

    with contextlib.ExitStack() as stack:
        if progress is not None:
            stack.callback(progress.close)
        stack.enter_context(preserved_state(model, config.seed))
        stack.enter_context(policy_generation_defaults(model))
        for batch in batches:
            input_ids, attention_mask = _left_pad([encoded[i] for i in batch], pad_token_id, device)
            recorder = StepEntropyRecorder()
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=generation_config,
                logits_processor=LogitsProcessorList([*warpers, recorder.logits_processor]),
                stopping_criteria=StoppingCriteriaList([recorder.stopping_criteria]),
            )  # [P * M, W + K]
            generated = sequences[:, input_ids.shape[1] :]  # [P * M, K]
            step_entropies, token_logprobs = recorder.stacked()  # [P * M, >= K]
            num_generated = generated.shape[1]
            step_entropies = step_entropies[:, :num_generated]
            token_logprobs = token_logprobs[:, :num_generated]
            lengths, truncated = rollout_lengths(generated, eos_ids, config.max_new_tokens)

            for slot, prompt_index in enumerate(batch):
                rows = slice(slot * config.num_rollouts, (slot + 1) * config.num_rollouts)
                stats = summarize_rollouts(step_entropies[rows], token_logprobs[rows], lengths[rows], truncated[rows])
                positions = torch.arange(num_generated, device=lengths.device)
                active = positions[None, :] < lengths[rows, None]  # [M, K]
                token_ids = [generated[row, : int(lengths[row])].tolist() for row in range(rows.start, rows.stop)]
                results[prompt_index] = PromptRollouts(
                    prompt=prompts[prompt_index],
                    texts=[tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids],
                    token_ids=token_ids,
                    stats=stats,
                    step_entropies=torch.where(active, step_entropies[rows], 0.0).float().cpu(),
                )
            if progress is not None:
                progress.update(len(batch))

    return [results[i] for i in range(len(prompts))]
