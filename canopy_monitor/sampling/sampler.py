"""Turn a model, a tokenizer and prompts into per-rollout figures with `generate`."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import numbers
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..config import SamplingConfig
from ..estimators import RolloutStats, summarize_rollouts
from ..prompts import Prompt, encode_prompts, model_context_length
from .decoder import cache_argument, decode_prompts, left_pad, new_cache, padded_positions
from .memory import batch_rows
from .policy import (
    build_warpers,
    padding_changes_policy,
    policy_generation_config,
    policy_generation_defaults,
    report_once,
)
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

    A configured id outside the model's vocabulary can never be sampled, so it is
    left out with a warning.

    Raises:
        `ValueError`: an id in `extra` is not a non-negative integer or is outside the
            model's vocabulary, or there is no usable id at all.
    """
    vocabulary_size = _vocabulary_size(model)
    configured_ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        configured_ids.append(configured)
    elif configured is not None:
        configured_ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        configured_ids.append(int(tokenizer.eos_token_id))

    ids: list[int] = []
    for token_id in configured_ids:
        if vocabulary_size is not None and not 0 <= token_id < vocabulary_size:
            report_once(
                logging.WARNING,
                ("eos outside vocabulary", token_id, vocabulary_size),
                f"The end-of-sequence id {token_id} of the model's generation config or tokenizer is outside "
                f"the model's vocabulary of {vocabulary_size} tokens, so canopy-monitor leaves it out.",
            )
            continue
        ids.append(token_id)
    for token_id in extra or ():
        if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral) or token_id < 0:
            raise ValueError(f"eos_token_ids must be non-negative integer token ids, got {token_id!r}.")
        if vocabulary_size is not None and token_id >= vocabulary_size:
            raise ValueError(
                f"eos_token_ids contains {token_id}, which is outside the model's vocabulary of "
                f"{vocabulary_size} tokens, so no rollout could end with it."
            )
        ids.append(int(token_id))
    unique = sorted(set(ids))
    if not unique:
        raise ValueError(
            "the model and tokenizer define no end-of-sequence token, so no rollout could end before the "
            "length cap; set generation_config.eos_token_id or pass eos_token_ids"
        )
    return unique


def _vocabulary_size(model) -> int | None:
    """Return the number of logits the model outputs, or `None` when it cannot be read."""
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(output_embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


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


@dataclass(frozen=True)
class PolicyGeneration:
    """The `generate` set-up of one decoding policy, shared by `sample_rollouts` and the
    exact tree walker of `canopy_monitor.exact`, so that both use the same distribution.

    Attributes:
        config (`SamplingConfig`): decoding policy and budget.
        eos_token_ids (`list[int]`): every id that ends a rollout.
        pad_token_id (`int`): the tokenizer's padding id, or the first end-of-sequence id.
        warpers (`LogitsProcessorList`): temperature, top-k and top-p, from `build_warpers`.
    """

    config: SamplingConfig
    eos_token_ids: list[int]
    pad_token_id: int
    warpers: LogitsProcessorList

    @classmethod
    def build(cls, model, tokenizer, config: SamplingConfig, eos_token_ids: Sequence[int] | None = None) -> "PolicyGeneration":
        """Resolve the end-of-sequence and padding ids and build the warpers.

        Raises:
            `ValueError`: from `resolve_eos_token_ids`.
        """
        eos_ids = resolve_eos_token_ids(model, tokenizer, eos_token_ids)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        return cls(config=config, eos_token_ids=eos_ids, pad_token_id=pad_token_id, warpers=build_warpers(config))

    def encode(self, model, tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Encode prompts as the sampler does (`encode_prompts` with the config's options)."""
        return encode_prompts(
            tokenizer,
            prompts,
            use_chat_template=self.config.use_chat_template,
            max_new_tokens=self.config.max_new_tokens,
            context_length=model_context_length(model),
        )

    @contextlib.contextmanager
    def session(self, model) -> Iterator[None]:
        """Seed the private random stream, reduce the model's generation config to its
        policy fields, and restore the model and every global random state on exit."""
        with preserved_state(model, self.config.seed), policy_generation_defaults(model, self.config):
            yield

    def generate(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        num_return_sequences: int,
        after_policy: Sequence[LogitsProcessor],
        stopping_criteria: Sequence[StoppingCriteria],
        model_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """Call `generate` inside `session`, with the length cap `T` of the config.

        The processors of the model's generation config act first, relative to the real
        prompt, then the warpers, then `after_policy`: processors that see the final
        distribution of each step (a recorder) or replace it (a forced path).
        `model_kwargs` go to `generate` as they are (a prefilled cache, say).

        Returns:
            `torch.Tensor` of shape `[B * num_return_sequences, W + K]`: the sequences.
        """
        generation_config = policy_generation_config(self.config, self.eos_token_ids, self.pad_token_id, num_return_sequences)
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([*self.warpers, *after_policy]),
            stopping_criteria=StoppingCriteriaList(stopping_criteria),
            **(model_kwargs or {}),
        )


def shared_prefill(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_rollouts: int
) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """Run each prompt through the model once and copy its key-value cache for every rollout.

    `generate` with `num_return_sequences` copies each prompt before its first forward
    pass, so the prompt's tokens are processed once per rollout. Here every prompt
    token but the last is processed once. `generate` then receives the rows already
    repeated with the copied cache, processes the last prompt token and samples from
    there, with the same positions and the same processors as without the cache.

    Args:
        model: a causal LM (a PEFT model works).
        input_ids, attention_mask (`torch.Tensor` of shape `[P, W]`): left-padded prompts.
        num_rollouts (`int`): rollouts per prompt, `M`.

    Returns:
        `(input_ids [P * M, W], attention_mask [P * M, W], model_kwargs)` for
        `PolicyGeneration.generate` with `num_return_sequences=1`, or `None` when the
        prompts are single tokens or the model does not take a cache argument this way.
    """
    forward = cache_argument(model)
    if input_ids.shape[1] < 2 or forward is None:
        return None
    cache_keyword, takes_logits_to_keep = forward
    cache = new_cache(model)

    prefix_ids = input_ids[:, :-1]  # [P, W - 1]
    prefix_mask = attention_mask[:, :-1]  # [P, W - 1]
    options = {cache_keyword: cache, "use_cache": True}
    if takes_logits_to_keep:
        options["logits_to_keep"] = 1
    model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=padded_positions(prefix_mask), **options)
    cache.batch_repeat_interleave(num_rollouts)
    return (
        input_ids.repeat_interleave(num_rollouts, dim=0),
        attention_mask.repeat_interleave(num_rollouts, dim=0),
        {cache_keyword: cache},
    )


def _prompt_batches(encoded: Sequence[Sequence[int]], prompts_per_batch: int, equal_lengths: bool) -> list[list[int]]:
    """Group prompt indices into batches, sorted by length so that batches need little padding.

    With `equal_lengths`, a batch holds only prompts of one encoded length, so no row is padded.
    """
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    groups = [order]
    if equal_lengths:
        groups = [list(group) for _, group in itertools.groupby(order, key=lambda i: len(encoded[i]))]
    batches = []
    for group in groups:
        for start in range(0, len(group), prompts_per_batch):
            batches.append(group[start : start + prompts_per_batch])
    return batches


def _sample_with_generate(
    model, policy: PolicyGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample a batch with `generate`, each prompt prefilled once where the model allows.

    Returns:
        `(generated [B, K], step_entropies [B, K], token_logprobs [B, K])`.
    """
    num_rollouts = policy.config.num_rollouts
    recorder = StepEntropyRecorder()
    prefilled = shared_prefill(model, input_ids, attention_mask, num_rollouts)
    if prefilled is None:
        sequences = policy.generate(
            model,
            input_ids,
            attention_mask,
            num_return_sequences=num_rollouts,
            after_policy=[recorder.logits_processor],
            stopping_criteria=[recorder.stopping_criteria],
        )  # [P * M, W + K]
    else:
        repeated_ids, repeated_mask, model_kwargs = prefilled
        sequences = policy.generate(
            model,
            repeated_ids,
            repeated_mask,
            num_return_sequences=1,
            after_policy=[recorder.logits_processor],
            stopping_criteria=[recorder.stopping_criteria],
            model_kwargs=model_kwargs,
        )  # [P * M, W + K]
    generated = sequences[:, input_ids.shape[1] :]  # [P * M, K]
    step_entropies, token_logprobs = recorder.stacked()  # [P * M, >= K]
    num_generated = generated.shape[1]
    return generated, step_entropies[:, :num_generated], token_logprobs[:, :num_generated]


def _rows_from_memory(model, encoded: Sequence[Sequence[int]], config: SamplingConfig) -> int:
    return batch_rows(
        model,
        num_rollouts=config.num_rollouts,
        prompt_width=max(len(ids) for ids in encoded),
        max_new_tokens=config.max_new_tokens,
        device=_model_device(model),
    )


def resolve_batch_size(model, tokenizer, prompts: Sequence[Prompt], config: SamplingConfig) -> SamplingConfig:
    """Return `config` with `batch_size` chosen from the free memory now, if it is `None`.

    The `generate` fallback draws other rollouts for a seed with another batch size, so
    a run that samples the same prompts several times fixes it once, and its points
    differ only in the weights whichever way they are sampled.
    """
    if config.batch_size is not None:
        return config
    encoded = PolicyGeneration.build(model, tokenizer, config).encode(model, tokenizer, prompts)
    return dataclasses.replace(config, batch_size=_rows_from_memory(model, encoded, config))


def _prompt_rollouts(
    prompt: Prompt,
    generated: torch.Tensor,
    step_entropies: torch.Tensor,
    token_logprobs: torch.Tensor,
    policy: PolicyGeneration,
    tokenizer,
) -> PromptRollouts:
    """Collect one prompt's rollouts from its generated tokens `[M, K]` and step figures `[M, K]`."""
    lengths, truncated = rollout_lengths(generated, policy.eos_token_ids, policy.config.max_new_tokens)
    stats = summarize_rollouts(step_entropies, token_logprobs, lengths, truncated)
    positions = torch.arange(generated.shape[1], device=lengths.device)
    active = positions[None, :] < lengths[:, None]  # [M, K]
    token_ids = [generated[row, : int(lengths[row])].tolist() for row in range(generated.shape[0])]
    return PromptRollouts(
        prompt=prompt,
        texts=[tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids],
        token_ids=token_ids,
        stats=stats,
        step_entropies=torch.where(active, step_entropies, 0.0).float().cpu(),
    )


@torch.no_grad()
def sample_rollouts(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    config: SamplingConfig,
    *,
    eos_token_ids: Sequence[int] | None = None,
    prompt_keys: Sequence[int] | None = None,
    show_progress: bool = False,
) -> list[PromptRollouts]:
    """Sample `config.num_rollouts` rollouts per prompt and record their figures.

    Prompts are encoded (with the chat template unless `config.use_chat_template` is
    false), sorted by length so that batches need little padding, left-padded by
    hand (the tokenizer is never modified) and sampled in batches of at most
    `config.batch_size` rollouts (by default as many as fit in a share of the free
    memory, `memory.batch_rows`). Each prompt is run through the model once and its
    key-value cache copied for its rollouts. `decoder.decode_prompts` samples and drops
    each rollout from the batch when it ends; where a processor could not follow rows
    leaving, `generate` samples instead. When a processor of the model's generation
    config would read the padding (`min_length`, n-gram bans, sequence biases), only
    prompts of one length share a batch. Step entropies are of the decoding policy
    that is sampled from, computed at each step: the processors of the policy fields
    (`policy.POLICY_FIELDS`) from the model's generation config, then temperature,
    top-k and top-p. The model's training mode and every global random state are as
    before when this returns.

    Args:
        model: a causal LM with `generate` (a PEFT model works).
        tokenizer: its tokenizer.
        prompts (sequence of `Prompt`): the prompts, in the order results are returned.
        config (`SamplingConfig`): decoding policy and budget.
        eos_token_ids (sequence of `int`, *optional*): end-of-sequence ids added to
            those of the generation config and the tokenizer.
        prompt_keys (sequence of `int`, *optional*): one non-negative key per prompt that
            seeds its random numbers with `config.seed` (see `draws`); defaults to the
            prompts' positions. With the sampler's loop a prompt's rollouts depend only
            on the model, the prompt, the seed and its key. The `generate` fallback
            ignores the keys and draws from one stream seeded with `config.seed`.
        show_progress (`bool`, *optional*, defaults to `False`): show a progress bar.

    Returns:
        `list[PromptRollouts]`, one per prompt, in the order of `prompts`.
    """
    if prompt_keys is not None and len(prompt_keys) != len(prompts):
        raise ValueError(f"prompt_keys has {len(prompt_keys)} keys for {len(prompts)} prompts.")
    policy = PolicyGeneration.build(model, tokenizer, config, eos_token_ids)
    eos_ids = policy.eos_token_ids
    encoded = policy.encode(model, tokenizer, prompts)
    device = _model_device(model)
    rows = config.batch_size if config.batch_size is not None else _rows_from_memory(model, encoded, config)
    batches = _prompt_batches(encoded, max(1, rows // config.num_rollouts), equal_lengths=padding_changes_policy(model))
    results: dict[int, PromptRollouts] = {}

    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(prompts), desc="canopy-monitor sampling", unit="prompt", leave=False)

    with contextlib.ExitStack() as stack:
        if progress is not None:
            stack.callback(progress.close)
        stack.enter_context(policy.session(model))
        on_prompt_done = (lambda index: progress.update(1)) if progress is not None else None
        order = [index for batch in batches for index in batch]
        run = decode_prompts(
            model, policy, encoded, order, rows=rows, prompt_keys=prompt_keys, on_prompt_done=on_prompt_done
        )
        if run is not None:
            for index, decoded in run.rollouts.items():
                results[index] = _prompt_rollouts(
                    prompts[index], decoded.generated, decoded.step_entropies, decoded.token_logprobs, policy, tokenizer
                )
        else:
            for batch in batches:
                input_ids, attention_mask = left_pad([encoded[i] for i in batch], policy.pad_token_id, device)
                generated, step_entropies, token_logprobs = _sample_with_generate(model, policy, input_ids, attention_mask)
                for slot, prompt_index in enumerate(batch):
                    rows_of_prompt = slice(slot * config.num_rollouts, (slot + 1) * config.num_rollouts)
                    results[prompt_index] = _prompt_rollouts(
                        prompts[prompt_index],
                        generated[rows_of_prompt],
                        step_entropies[rows_of_prompt],
                        token_logprobs[rows_of_prompt],
                        policy,
                        tokenizer,
                    )
                if progress is not None:
                    progress.update(len(batch))

    return [results[i] for i in range(len(prompts))]
