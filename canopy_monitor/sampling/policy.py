"""The decoding policy the monitor samples from, and what it takes from the model's generation config.

The policy is the monitor's own temperature, top-k and top-p (`SamplingConfig`),
after the distribution-shaping processors of the model's generation config
(penalties, banned and forced tokens, length constraints). Every other field of the
model's generation config is set aside while the monitor samples. Each one that
would change the distribution is logged once per process.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..config import SamplingConfig

logger = logging.getLogger(__name__)


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


def policy_generation_config(
    config: SamplingConfig, eos_token_ids: list[int], pad_token_id: int, num_return_sequences: int
) -> GenerationConfig:
    # The warpers are passed as custom processors so that the recorder can follow
    # them. `generate` would otherwise append its own warpers after every custom
    # processor, so each one is set to its neutral value here. Explicit values also
    # keep the model's own generation defaults (top_k=50 for many models, a
    # temperature, a min_p) from changing the policy; min_p=0.0 is a no-op.
    # `typical_p`, `epsilon_cutoff` and `eta_cutoff` from the model's generation
    # config are neutralised the same way. `top_h` and `watermarking_config` have no
    # neutral value, but `policy_generation_defaults` drops them from the model's
    # generation config, so in transformers 5.25 the only processor after the
    # recorder is `MinPLogitsWarper(0.0)`, which removes no token.
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
        num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_ids,
        pad_token_id=pad_token_id,
        use_cache=True,
    )


# Fields of the model's own generation config that shape the distribution before the
# warpers (penalties, banned and forced tokens). They stay part of the decoding policy.
# Every other field (stop strings, assisted decoding, output options) is dropped while
# the monitor samples, because it would change what `generate` returns or how it runs.
# `encoder_repetition_penalty` and `encoder_no_repeat_ngram_size` act on decoder-only
# models too: `generate` hands them the prompt as the encoder input.
POLICY_FIELDS = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
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

# Policy fields whose processors read the left padding of a batch as part of the
# prompt. `min_length` and the forced first token count the padding, and the n-gram,
# sequence-bias and encoder processors see the padding ids. With any of them set, only
# prompts of the same encoded length share a batch, so each is sampled as if alone.
_PADDING_SENSITIVE_FIELDS = (
    "min_length",
    "forced_bos_token_id",
    "no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
)

# Values of the padding-sensitive fields for which `generate` builds no processor.
_NEUTRAL_VALUES = {
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
}


def _is_set(value) -> bool:
    return value is not None


def _below_one(value) -> bool:
    return value is not None and value < 1.0


def _above_one(value) -> bool:
    return value is not None and value > 1


def _strictly_between_zero_and_one(value) -> bool:
    return value is not None and 0.0 < value < 1.0


def _positive(value) -> bool:
    return value is not None and value > 0


def _not_neutral_scale(value) -> bool:
    return value is not None and value != 1


def _truthy(value) -> bool:
    return bool(value)


_ONLY_THREE_FILTERS = (
    "SamplingConfig offers only temperature, top_k and top_p: set one of them as the nearest filter, "
    "or unset the field so that the model generates as it is measured."
)

# Fields of the model's generation config that would change what `generate` samples,
# but that the monitor drops (checked against `_get_logits_processor`,
# `_get_stopping_criteria` and `generate` of transformers 5.25). Each entry is the
# field, the test for a value that acts, and what the user can do. Left out on
# purpose: `renormalize_logits` (a log-softmax, which leaves the distribution as it is),
# `remove_invalid_values` (acts only on NaN or infinite logits, with which sampling
# fails anyway) and output, cache and assisted-decoding options.
_DROPPED_POLICY_FIELDS = (
    ("min_p", _positive, _ONLY_THREE_FILTERS),
    ("top_h", _is_set, _ONLY_THREE_FILTERS),
    ("typical_p", _below_one, _ONLY_THREE_FILTERS),
    ("epsilon_cutoff", _strictly_between_zero_and_one, _ONLY_THREE_FILTERS),
    ("eta_cutoff", _strictly_between_zero_and_one, _ONLY_THREE_FILTERS),
    (
        "guidance_scale",
        _not_neutral_scale,
        "Classifier-free guidance needs a negative prompt per prompt, which the monitor does not take.",
    ),
    (
        "watermarking_config",
        _is_set,
        "A watermark would act after the step entropies are recorded, so the monitor leaves it out.",
    ),
    (
        "token_healing",
        _truthy,
        "Token healing rewrites the end of each prompt; end the prompts at a token boundary instead.",
    ),
    (
        "stop_strings",
        _truthy,
        "Rollouts end only at end-of-sequence ids; pass the ids of stop strings that are single "
        "tokens as eos_token_ids.",
    ),
    (
        "num_beams",
        _above_one,
        "Canopy entropy is defined for sampling one token at a time, so the monitor always uses num_beams=1.",
    ),
    (
        "penalty_alpha",
        _positive,
        "Contrastive search is not a sampling policy; the monitor samples one token at a time.",
    ),
    (
        "dola_layers",
        _is_set,
        "DoLa decoding is not applied; the monitor samples from the final layer's logits.",
    ),
)

# Fields that the monitor's own `SamplingConfig` replaces, with the value that leaves
# the distribution as it is.
_REPLACED_POLICY_FIELDS = (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))

# Causes already logged in this process, so that each is logged once however many
# times the monitor samples.
_reported_causes: set[tuple] = set()


def report_once(level: int, cause: tuple, message: str) -> None:
    """Log `message` at `level` unless a message with the same `cause` was logged in this process."""
    if cause in _reported_causes:
        return
    _reported_causes.add(cause)
    logger.log(level, message)


def _report_unapplied_fields(generation_config: GenerationConfig, config: SamplingConfig | None) -> None:
    """Log the fields of the model's generation config that the monitor does not apply.

    A dropped field that would change the distribution is a warning: the figures then
    describe a policy that the user cannot reach through the monitor. A temperature,
    top_k or top_p that differs from the monitor's is an info line, because the
    monitor's `SamplingConfig` is the documented policy and the user can set it there.
    """
    for name, acts, advice in _DROPPED_POLICY_FIELDS:
        value = getattr(generation_config, name, None)
        if not acts(value):
            continue
        report_once(
            logging.WARNING,
            ("dropped", name, repr(value)),
            f"The model's generation config sets {name}={value!r}, which canopy-monitor does not apply: "
            f"the figures describe sampling without it. {advice}",
        )
    if config is None:
        return
    for name, neutral in _REPLACED_POLICY_FIELDS:
        value = getattr(generation_config, name, None)
        model_value = neutral if value is None else value
        monitor_value = getattr(config, name)
        if model_value == monitor_value:
            continue
        report_once(
            logging.INFO,
            ("replaced", name, repr(model_value), repr(monitor_value)),
            f"The model's generation config sets {name}={model_value!r}, but canopy-monitor samples with "
            f"its own {name}={monitor_value!r}: the figures describe that policy. To measure the model's "
            f"setting, pass {name}={model_value!r} in SamplingConfig.",
        )


def _owner_generation_config(model) -> GenerationConfig | None:
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(owner, "generation_config", None)


def padding_changes_policy(model) -> bool:
    """Check whether a processor of the model's generation config would read left padding."""
    generation_config = _owner_generation_config(model)
    if generation_config is None:
        return False
    for name in _PADDING_SENSITIVE_FIELDS:
        value = getattr(generation_config, name, None)
        if value is not None and value != _NEUTRAL_VALUES.get(name):
            return True
    return False


@contextlib.contextmanager
def policy_generation_defaults(model, config: SamplingConfig | None = None) -> Iterator[None]:
    """Reduce the model's generation config to the fields of `POLICY_FIELDS` while
    sampling, and put the original back afterwards.

    `generate` fills every field that the passed config leaves unset from
    `model.generation_config`, so a model that ships, say, `stop_strings` or
    `return_dict_in_generate=True` would otherwise break sampling. Dropped fields that
    would change the sampled distribution are logged once per process, as a warning
    each. With `config`, a model temperature, top_k or top_p that differs from the
    monitor's is logged once as an info line.
    """
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(owner, "generation_config", None)
    if original is None:
        yield
        return
    _report_unapplied_fields(original, config)
    policy_values = {
        name: getattr(original, name) for name in POLICY_FIELDS if getattr(original, name, None) is not None
    }
    owner.generation_config = GenerationConfig(**policy_values)
    try:
        yield
    finally:
        owner.generation_config = original
