"""A sampling loop that drops each rollout as soon as it ends and refills the batch.

`generate` keeps every row of a batch in each forward pass until the longest row
ends, so a batch costs as much as its longest rollout times the batch size.
`decode_prompts` samples from the same distribution: for each prompt, the processors
`generate` builds from the same generation config, then the monitor's warpers. But
it keeps a fixed number of rows busy. A rollout leaves the batch at its end, and the
next prompt's rollouts take the free rows as soon as there is room for all of them.

Rows of different prompts and lengths share one key-value cache, allocated once at
its final size (`rows x (longest prompt + T - 1)` positions) and written in place.
Each row's prompt starts at position 0, a row's new states go to its own next
position, and the attention mask hides the positions a row has not reached. So
memory does not grow step by step, and no row carries another row's padding.

The loop relies on private methods of `transformers`' generation mixin (those
`generate` itself calls to build its processors). `decode_prompts` returns `None`
before sampling anything when they are missing, when the model's cache is not the
plain per-layer kind, or when a processor could not follow rows leaving the batch.
The sampler then falls back to `generate`.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.generation import logits_process

from .draws import inverse_transform_sample, rollout_uniforms
from .policy import policy_generation_config
from .recorder import policy_entropy

logger = logging.getLogger(__name__)

# Processors whose output for a row depends only on that row's tokens and scores and
# on the current length, so rows may leave the batch between steps. Processors that
# map rows to prompts (the encoder ones, prefix constraints) or keep state across
# steps are not listed, so a policy with one of them is sampled with `generate`.
_ROW_WISE_PROCESSORS = tuple(
    getattr(logits_process, name)
    for name in (
        "MinLengthLogitsProcessor",
        "MinNewTokensLengthLogitsProcessor",
        "TemperatureLogitsWarper",
        "RepetitionPenaltyLogitsProcessor",
        "TopPLogitsWarper",
        "TopKLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "NoRepeatNGramLogitsProcessor",
        "SequenceBiasLogitsProcessor",
        "NoBadWordsLogitsProcessor",
        "ForcedBOSTokenLogitsProcessor",
        "ForcedEOSTokenLogitsProcessor",
        "InfNanRemoveLogitsProcessor",
        "ExponentialDecayLengthPenalty",
        "LogitNormalization",
        "SuppressTokensAtBeginLogitsProcessor",
        "SuppressTokensLogitsProcessor",
    )
    if hasattr(logits_process, name)
)


@dataclass(frozen=True)
class DecodedRollouts:
    """Tokens and step figures of the `M` rollouts of one prompt.

    Attributes:
        generated (`torch.Tensor` of shape `[M, K]`, long): tokens after the prompt,
            the padding id after each rollout's end; `K` is the longest rollout's length.
        step_entropies (`torch.Tensor` of shape `[M, K]`): `h_t`, 0 after each end.
        token_logprobs (`torch.Tensor` of shape `[M, K]`): `log pi(y_t | x, y_<t)`, 0 after each end.
    """

    generated: torch.Tensor
    step_entropies: torch.Tensor
    token_logprobs: torch.Tensor


@dataclass(frozen=True)
class DecodingRun:
    """The rollouts of every prompt and the work done for them.

    Attributes:
        rollouts (`dict[int, DecodedRollouts]`): by prompt index.
        row_steps (`int`): rows summed over the decoding forward passes, prefill
            excluded. A rollout of `n` tokens costs `n - 1`.
        forward_passes (`int`): decoding forward passes, prefill excluded.
    """

    rollouts: dict[int, DecodedRollouts]
    row_steps: int
    forward_passes: int


def prompt_processors(model, policy, prompt_ids: Sequence[int], device) -> LogitsProcessorList | None:
    """Build the processors `generate` would use for the rollouts of one prompt.

    Mirrors the set-up `generate` does before its first step (generation config merged
    with the model's, special-token tensors, lengths from `max_new_tokens`, the
    attention mask of every rollout), with the policy's warpers passed as custom
    processors, as `PolicyGeneration.generate` does. Call it inside
    `policy.session(model)`.

    Returns:
        `LogitsProcessorList`, or `None` when this version of `transformers` lacks the
        methods used or a processor could not follow rows leaving the batch.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = policy.config
    requested = policy_generation_config(config, policy.eos_token_ids, policy.pad_token_id, config.num_rollouts)
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # [1, w]
    owner_config = base.generation_config
    try:
        generation_config, _ = base._prepare_generation_config(requested)
        base._prepare_special_tokens(generation_config, True, device=device)
        generation_config = base._prepare_generated_length(
            generation_config=generation_config,
            # As `generate` computes them, for the same lengths and warnings.
            has_default_max_length=requested.max_length is None and owner_config.max_length is None,
            has_default_min_length=requested.min_length is None and owner_config.min_length is None,
            model_input_name="input_ids",
            input_ids_length=input_ids.shape[1],
            inputs_tensor=input_ids,
        )
        processors = base._get_logits_processor(
            generation_config=generation_config,
            input_ids_seq_length=input_ids.shape[1],
            encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=None,
            logits_processor=LogitsProcessorList(policy.warpers),
            device=device,
            model_kwargs={"attention_mask": torch.ones((config.num_rollouts, input_ids.shape[1]), device=device)},
        )
    except (AttributeError, TypeError) as error:
        logger.debug("canopy-monitor samples with generate: building the processors failed (%s)", error)
        return None
    others = sorted({type(p).__name__ for p in processors if not isinstance(p, _ROW_WISE_PROCESSORS)})
    if others:
        logger.debug("canopy-monitor samples with generate because of %s", ", ".join(others))
        return None
    return processors


def cache_argument(model) -> tuple[str, bool] | None:
    """Return the forward pass's keyword for a cache and whether it takes `logits_to_keep`,
    or `None` when it does not take a cache and positions this way."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    # transformers 5 names the argument `cache`; 4.x named it `past_key_values`.
    name = next((name for name in ("cache", "past_key_values") if name in parameters), None)
    if name is None or "position_ids" not in parameters:
        return None
    return name, "logits_to_keep" in parameters


class _Slots:
    """Bookkeeping of the batch rows: the rollout in each row and the positions it has filled.

    Rows `[0, live)` are in use. `lengths[r]` is the position row `r` writes next,
    which is also its position id.
    """

    def __init__(self, rows: int, device) -> None:
        self.live = 0
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.cohorts = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.rollouts = torch.zeros(rows, dtype=torch.long, device=device)
        self.max_length = 0

    def refresh_max_length(self) -> None:
        self.max_length = int(self.lengths[: self.live].max()) if self.live else 0


class _SlotLayer(DynamicLayer):
    """One layer's keys and values for every row, allocated once.

    Storage is `[rows, heads, capacity, head_dim]`, zero-filled so that positions a row
    has not reached hold finite numbers (the mask removes them, but a NaN times a zero
    attention weight would still be NaN). `keys` and `values` expose rows `[0, live)`
    and positions `[0, max_length)`.
    """

    def __init__(self, slots: _Slots, rows: int, capacity: int, like: torch.Tensor) -> None:
        super().__init__()
        shape = (rows, like.shape[1], capacity, like.shape[-1])
        self._slots = slots
        self._key_storage = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self._value_storage = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.device = like.device
        self.is_initialized = True
        self._expose(slots.max_length)

    def _expose(self, width: int) -> None:
        live = self._slots.live
        self.keys = self._key_storage[:live, :, :width]
        self.values = self._value_storage[:live, :, :width]

    def write_prompt(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write a prompt's states `[heads, w, head_dim]` at positions `[0, w)` of every row in `rows`."""
        width = keys.shape[-2]
        self._key_storage[rows, :, :width] = keys.to(self._key_storage.dtype)
        self._value_storage[rows, :, :width] = values.to(self._value_storage.dtype)

    def move_rows(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        # Indexing copies the sources out first, so overlapping rows are safe.
        self._key_storage[targets] = self._key_storage[sources]
        self._value_storage[targets] = self._value_storage[sources]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write each row's new states `[live, heads, 1, head_dim]` at its own next position."""
        if key_states.shape[-2] != 1:
            raise RuntimeError("the batch decoding cache takes one new position per row and step")
        live = self._slots.live
        rows = torch.arange(live, device=key_states.device)
        positions = self._slots.lengths[:live]
        # Under autocast the new states may come in another dtype than the prefill's.
        self._key_storage[rows, :, positions] = key_states[:, :, 0].to(self._key_storage.dtype)
        self._value_storage[rows, :, positions] = value_states[:, :, 0].to(self._value_storage.dtype)
        self._expose(self._slots.max_length + 1)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._slots.max_length

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the batch decoding cache manages its rows itself")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the batch decoding cache manages its rows itself")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the batch decoding cache cannot be cropped")


class _PromptState:
    """One prompt whose rollouts are being sampled.

    Keeps the prompt's prefilled states and next-token logits until every rollout has
    joined the batch, and the tokens and step figures of all its rollouts.
    """

    def __init__(
        self,
        prompt_index: int,
        prompt_ids: Sequence[int],
        processors: LogitsProcessorList,
        logits: torch.Tensor,
        states: list[tuple[torch.Tensor, torch.Tensor]],
        policy,
        key: int,
    ) -> None:
        config = policy.config
        num_rollouts, max_new_tokens = config.num_rollouts, config.max_new_tokens
        device = logits.device
        self.prompt_index = prompt_index
        self.width = len(prompt_ids)
        self.processors = processors
        # `generate` gives the repetition penalty each row's padding length; here no row
        # is padded, but the tensor must still follow the rows that are passed.
        self._ignored_lengths = [
            (processor, processor.prompt_ignore_length)
            for processor in processors
            if isinstance(getattr(processor, "prompt_ignore_length", None), torch.Tensor)
        ]
        self.logits = logits  # [V]
        self.states = states  # per layer: keys and values [heads, w, head_dim]
        self.joined = 0  # rollouts that have joined the batch
        self.ended = 0
        self.longest = 0
        self.tokens = torch.full((num_rollouts, self.width + max_new_tokens), policy.pad_token_id, dtype=torch.long, device=device)
        self.tokens[:, : self.width] = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
        self.generated = torch.full((num_rollouts, max_new_tokens), policy.pad_token_id, dtype=torch.long, device=device)
        self.step_entropies = torch.zeros((num_rollouts, max_new_tokens), dtype=torch.float32, device=device)
        self.token_logprobs = torch.zeros((num_rollouts, max_new_tokens), dtype=torch.float32, device=device)
        self.uniforms = rollout_uniforms(config.seed, key, num_rollouts, max_new_tokens, device=device)  # [M, T]

    def process(self, rollouts: torch.Tensor, step: int, logits: torch.Tensor) -> torch.Tensor:
        """Apply the processors to the next-token logits `[n, V]` of `rollouts`, all at `step`."""
        for processor, lengths in self._ignored_lengths:
            processor.prompt_ignore_length = lengths.to(rollouts.device)[rollouts]
        return self.processors(self.tokens[rollouts, : self.width + step], logits)

    def record(self, rollouts, step: int, sampled, entropies, logprobs) -> None:
        self.generated[rollouts, step] = sampled
        self.step_entropies[rollouts, step] = entropies
        self.token_logprobs[rollouts, step] = logprobs
        self.tokens[rollouts, self.width + step] = sampled
        self.longest = max(self.longest, step + 1)

    def result(self) -> DecodedRollouts:
        return DecodedRollouts(
            generated=self.generated[:, : self.longest],
            step_entropies=self.step_entropies[:, : self.longest],
            token_logprobs=self.token_logprobs[:, : self.longest],
        )


@dataclass
class _Cohort:
    """Rollouts of one prompt that joined the batch together, so they are at the same step.

    Attributes:
        prompt (`_PromptState`): their prompt.
        step (`int`): tokens each has generated.
        live (`int`): how many have not ended.
    """

    prompt: _PromptState
    step: int
    live: int


@torch.no_grad()
def decode_prompts(
    model,
    policy,
    encoded: Sequence[Sequence[int]],
    order: Sequence[int],
    *,
    rows: int,
    prompt_keys: Sequence[int] | None = None,
    on_prompt_done: Callable[[int], None] | None = None,
) -> DecodingRun | None:
    """Sample `M` rollouts of each prompt with at most `rows` rollouts in a forward pass.

    Prompts join the batch in `order`. Whenever rows are free, the next rollouts take
    them, so the batch stays full until the last prompt has joined. Prompts run
    through the model once each (those joining together share that forward pass), and
    their states and next-token logits are copied for their rollouts. At each step
    every live row's scores go through its prompt's processors, at that row's step.
    One token per row is drawn from the processed distribution by inverse transform
    sampling, from that rollout's own uniform for that step (`draws.rollout_uniforms`),
    and its entropy and log-probability are recorded. So the rollouts do not depend on
    `rows` or `order`. A rollout ends at
    an end-of-sequence token or at the cap `T`. Call it inside `policy.session(model)`.

    Args:
        model: a decoder-only causal LM (a PEFT model works).
        policy (`PolicyGeneration`): decoding policy, end-of-sequence and padding ids.
        encoded (sequence of token id lists): every prompt, encoded.
        order (sequence of `int`): indices into `encoded`, in the order prompts join.
        rows (`int`): rows of the batch, at least 1; no more are allocated than there
            are rollouts.
        prompt_keys (sequence of `int`, *optional*): for each prompt of `encoded`, the key
            that seeds its uniforms with `policy.config.seed`; defaults to its index. A
            process that samples a share of a larger prompt list passes the prompts'
            indices in that list, so it draws what one process sampling all would.
        on_prompt_done (callable, *optional*): called with a prompt's index when its
            last rollout ends.

    Returns:
        `DecodingRun`, or `None` (before anything is sampled) when this model or
        policy must be sampled with `generate`.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = cache_argument(model)
    if forward is None or getattr(base.config, "is_encoder_decoder", False) or not order:
        return None
    cache_keyword, takes_logits_to_keep = forward
    config = policy.config
    num_rollouts, max_new_tokens = config.num_rollouts, config.max_new_tokens
    rows = max(1, min(rows, len(order) * num_rollouts))
    device = next(model.parameters()).device
    eos = torch.tensor(policy.eos_token_ids, device=device)

    processors = {index: prompt_processors(model, policy, encoded[index], device) for index in order}
    if any(value is None for value in processors.values()):
        return None

    slots = _Slots(rows, device)
    capacity = max(len(encoded[index]) for index in order) + max_new_tokens - 1
    cache: DynamicCache | None = None
    cohorts: dict[int, _Cohort] = {}
    finished: dict[int, DecodedRollouts] = {}
    waiting = deque(order)
    prefilled: deque[_PromptState] = deque()  # prompts with rollouts still to join
    logits = torch.empty((0, 0), device=device)
    row_steps = forward_passes = 0
    next_cohort_id = 0

    while waiting or prefilled or slots.live:
        # Fill the free rows: prefill as many waiting prompts as they need, then give
        # the rows to the prefilled prompts' next rollouts.
        free = rows - slots.live
        unjoined = sum(num_rollouts - prompt.joined for prompt in prefilled)
        if waiting and free > unjoined:
            count = min(len(waiting), -(-(free - unjoined) // num_rollouts))
            joining = [waiting.popleft() for _ in range(count)]
            prompt_logits, prompt_cache = _prefill(model, [encoded[i] for i in joining], cache_keyword, takes_logits_to_keep)
            if prompt_cache is None:
                if cache is None:
                    return None
                raise RuntimeError("the model's key-value cache changed kind between prompts")
            if cache is None:
                cache = _slot_cache(model, slots, rows, capacity, prompt_cache)
                if cache is None:
                    return None
            width = prompt_cache.layers[0].keys.shape[2]
            for slot, index in enumerate(joining):
                own = slice(width - len(encoded[index]), width)  # the prompt's positions in the left-padded prefill
                # Copies, so that the prefill's padded states are freed now.
                states = [(layer.keys[slot, :, own].clone(), layer.values[slot, :, own].clone()) for layer in prompt_cache.layers]
                key = prompt_keys[index] if prompt_keys is not None else index
                prefilled.append(_PromptState(index, encoded[index], processors[index], prompt_logits[slot], states, policy, key))
            del prompt_logits, prompt_cache
        joining_logits = []
        while prefilled and slots.live < rows:
            prompt = prefilled[0]
            count = min(rows - slots.live, num_rollouts - prompt.joined)
            cohorts[next_cohort_id] = _Cohort(prompt, step=0, live=count)
            _admit(slots, cache, next_cohort_id, prompt, count)
            joining_logits.append(prompt.logits.expand(count, -1))
            next_cohort_id += 1
            if prompt.joined == num_rollouts:
                prompt.states = prompt.logits = None
                prefilled.popleft()
        if joining_logits:
            logits = torch.cat([logits, *joining_logits]) if logits.numel() else torch.cat(joining_logits)

        # Sample one token for every live row from its prompt's processed distribution.
        live = slots.live
        scores = torch.empty_like(logits)  # [live, V]
        uniforms = torch.empty(live, dtype=torch.float64, device=device)
        members = {}
        for cohort_id in slots.cohorts[:live].unique().tolist():
            cohort = cohorts[cohort_id]
            cohort_rows = (slots.cohorts[:live] == cohort_id).nonzero().squeeze(1)
            members[cohort_id] = cohort_rows
            scores[cohort_rows] = cohort.prompt.process(slots.rollouts[cohort_rows], cohort.step, logits[cohort_rows])
            uniforms[cohort_rows] = cohort.prompt.uniforms[slots.rollouts[cohort_rows], cohort.step]
        entropies, logprobs = policy_entropy(scores)  # [live], [live, V]
        if bool(torch.isnan(logprobs).any()):
            raise FloatingPointError(
                "the model's next-token distribution is NaN for at least one rollout (NaN logits, or every "
                "token filtered out), so no token can be sampled"
            )
        sampled = inverse_transform_sample(logprobs, uniforms)  # [live]
        sampled_logprobs = logprobs.gather(1, sampled[:, None]).squeeze(1)
        ended = torch.isin(sampled, eos)  # [live]
        for cohort_id, cohort_rows in members.items():
            cohort = cohorts[cohort_id]
            prompt = cohort.prompt
            rollouts = slots.rollouts[cohort_rows]
            prompt.record(rollouts, cohort.step, sampled[cohort_rows], entropies[cohort_rows], sampled_logprobs[cohort_rows])
            cohort.step += 1
            if cohort.step == max_new_tokens:
                ended[cohort_rows] = True
            ending = int(ended[cohort_rows].sum())
            cohort.live -= ending
            prompt.ended += ending
            if cohort.live == 0:
                del cohorts[cohort_id]
            if prompt.ended == num_rollouts:
                finished[prompt.prompt_index] = prompt.result()
                if on_prompt_done is not None:
                    on_prompt_done(prompt.prompt_index)

        # Rows that ended leave; rows at the end of the batch fill their places.
        next_tokens = sampled
        if bool(ended.any()):
            next_tokens = _release(slots, cache, ended, sampled)
        if slots.live == 0:
            logits = torch.empty((0, 0), device=device)
            continue
        slots.refresh_max_length()
        live = slots.live
        positions = torch.arange(slots.max_length + 1, device=device)
        attention_mask = (positions[None, :] <= slots.lengths[:live, None]).long()  # [live, max_length + 1]
        outputs = model(
            input_ids=next_tokens[:, None],
            attention_mask=attention_mask,
            position_ids=slots.lengths[:live, None].clone(),
            **{cache_keyword: cache, "use_cache": True},
        )
        logits = outputs.logits[:, -1].float()  # [live, V]
        del outputs
        slots.lengths[:live] += 1
        slots.max_length += 1
        row_steps += live
        forward_passes += 1

    return DecodingRun(rollouts=finished, row_steps=row_steps, forward_passes=forward_passes)


def _prefill(model, prompts: Sequence[Sequence[int]], cache_keyword: str, takes_logits_to_keep: bool):
    """Run left-padded prompts through the model once.

    Returns:
        `(logits [n, V], cache)` with the states of every position, padding included;
        the cache is `None` when one of its layers is not a plain `DynamicLayer`.
    """
    input_ids, attention_mask = left_pad(prompts, 0, next(model.parameters()).device)  # [n, W]
    cache = new_cache(model)
    options = {cache_keyword: cache, "use_cache": True}
    if takes_logits_to_keep:
        options["logits_to_keep"] = 1
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=padded_positions(attention_mask), **options
    )
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return outputs.logits[:, -1].float(), None
    return outputs.logits[:, -1].float(), cache


def _slot_cache(model, slots: _Slots, rows: int, capacity: int, like: DynamicCache) -> DynamicCache | None:
    cache = new_cache(model)
    if not hasattr(cache, "layers"):
        return None
    cache.layers[:] = [_SlotLayer(slots, rows, capacity, layer.keys) for layer in like.layers]
    return cache


def _admit(slots: _Slots, cache: DynamicCache, cohort_id: int, prompt: _PromptState, count: int) -> None:
    """Give the prompt's next `count` rollouts the rows after the live ones, holding its states."""
    rows = torch.arange(slots.live, slots.live + count, device=slots.lengths.device)
    for layer, (keys, values) in zip(cache.layers, prompt.states):
        layer.write_prompt(rows, keys, values)
    slots.lengths[rows] = prompt.width
    slots.cohorts[rows] = cohort_id
    slots.rollouts[rows] = torch.arange(prompt.joined, prompt.joined + count, device=rows.device)
    slots.live += count
    prompt.joined += count


def _release(slots: _Slots, cache: DynamicCache, ended: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """Drop the rows that ended, moving rows from the end of the batch into their places.

    Returns:
        The sampled tokens of the rows that stay, in their new row order.
    """
    live = slots.live
    staying = live - int(ended.sum())
    holes = ended[:staying].nonzero().squeeze(1)  # rows to fill, below `staying`
    movers = (~ended[staying:]).nonzero().squeeze(1) + staying  # rows that stay, at or above `staying`
    if holes.numel():
        for layer in cache.layers:
            layer.move_rows(movers, holes)
        for state in (slots.lengths, slots.cohorts, slots.rollouts):
            state[holes] = state[movers]
        sampled = sampled.clone()
        sampled[holes] = sampled[movers]
    slots.live = staying
    return sampled[:staying]


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into `(input_ids [n, W], attention_mask [n, W])`."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # [n, W]
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [n, W]
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the positions `generate` gives left-padded rows: counted from each row's first token."""
    return (attention_mask.cumsum(dim=-1) - 1).masked_fill(attention_mask == 0, 1)


def new_cache(model) -> DynamicCache:
    """Return an empty `DynamicCache` for `model` (built from its config where the class takes one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return DynamicCache(config=base.config)
    except TypeError:
        return DynamicCache()
