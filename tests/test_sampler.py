import math
import random

import numpy as np
import pytest
import torch

from canopy_monitor.config import SamplingConfig
from canopy_monitor.estimators import estimate_prompt
from canopy_monitor.prompts import Prompt
from canopy_monitor.sampling import resolve_eos_token_ids, rollout_lengths, sample_rollouts

from conftest import VOCAB_WORDS, make_model

PROMPTS = [
    Prompt(text="what is the sum of two plus two ?"),
    Prompt(messages=({"role": "user", "content": "tell me a story"},)),
    Prompt(text="hello"),
]
VOCAB_SIZE = len(VOCAB_WORDS)


def test_uniform_policy_exact_entropies(tokenizer):
    # Every logit is 0, so h_t = log V at every step and -log pi(y_t) = log V too.
    model = make_model(zero_weights=True)
    config = SamplingConfig(num_rollouts=6, max_new_tokens=20, seed=1)

    results = sample_rollouts(model, tokenizer, PROMPTS, config)

    for result in results:
        lengths = result.stats.lengths.to(torch.float64)
        expected = lengths * math.log(VOCAB_SIZE)
        torch.testing.assert_close(result.stats.entropy_sums, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.stats.surprisal_sums, expected, rtol=1e-5, atol=1e-5)


def teacher_forced_figures(model, prompt_ids, rollout_ids, warpers):
    """Recompute S and L of one rollout from a forward pass with the same warpers."""
    ids = torch.tensor([prompt_ids + rollout_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [W + N, V]
    entropy_sum = 0.0
    surprisal_sum = 0.0
    for offset, token in enumerate(rollout_ids):
        position = len(prompt_ids) - 1 + offset
        scores = warpers(ids[:, : position + 1], logits[position : position + 1].clone())
        logprobs = torch.log_softmax(scores, dim=-1)[0].double()
        probs = logprobs.exp()
        entropy_sum += float(-torch.where(probs > 0, probs * logprobs, 0.0).sum())
        surprisal_sum += float(-logprobs[token])
    return entropy_sum, surprisal_sum


@pytest.mark.parametrize(
    "policy",
    [
        {"temperature": 1.0},
        {"temperature": 0.6},
        {"temperature": 1.7},
        {"top_k": 7},
        {"top_p": 0.8},
        {"temperature": 0.8, "top_k": 20, "top_p": 0.9},
    ],
)
def test_entropy_is_of_processed_policy(tokenizer, tiny_model, policy):
    from canopy_monitor.sampling import build_warpers

    config = SamplingConfig(num_rollouts=4, max_new_tokens=12, seed=3, use_chat_template=False, **policy)
    prompt_ids = tokenizer("hello world")["input_ids"]

    result = sample_rollouts(tiny_model, tokenizer, [Prompt(text="hello world")], config)[0]

    warpers = build_warpers(config)
    for index, rollout_ids in enumerate(result.token_ids):
        assert len(rollout_ids) == int(result.stats.lengths[index])
        entropy_sum, surprisal_sum = teacher_forced_figures(tiny_model, prompt_ids, rollout_ids, warpers)
        assert float(result.stats.entropy_sums[index]) == pytest.approx(entropy_sum, rel=1e-4, abs=1e-5)
        assert float(result.stats.surprisal_sums[index]) == pytest.approx(surprisal_sum, rel=1e-4, abs=1e-5)


def test_deterministic_policy_gives_zero(tokenizer, tiny_model):
    config = SamplingConfig(num_rollouts=5, max_new_tokens=12, top_k=1, seed=0)

    result = sample_rollouts(tiny_model, tokenizer, PROMPTS[:2], config)

    for prompt_result in result:
        estimates = estimate_prompt(prompt_result.stats)
        assert estimates.ce_star == 0.0
        assert estimates.ce_star_mc == pytest.approx(0.0, abs=1e-6)
        assert len(set(prompt_result.texts)) == 1
        assert len(set(prompt_result.stats.lengths.tolist())) == 1


def test_several_end_ids(tokenizer):
    model = make_model(zero_weights=True, eos_token_id=[2, 3])
    config = SamplingConfig(num_rollouts=8, max_new_tokens=60, seed=5)

    assert resolve_eos_token_ids(model, tokenizer) == [2, 3]
    results = sample_rollouts(model, tokenizer, PROMPTS, config)

    lengths = torch.cat([r.stats.lengths for r in results])
    truncated = torch.cat([r.stats.truncated for r in results])
    # P(end) = 2/V per step: most of the 24 rollouts end before 60 tokens.
    assert int((~truncated).sum()) >= 12
    assert bool((lengths[truncated] == 60).all())
    assert bool((lengths[~truncated] <= 60).all())


def test_rollout_lengths_first_end_counts():
    generated = torch.tensor([[5, 3, 9, 2], [5, 6, 7, 8], [2, 2, 2, 2], [7, 7, 7, 3]])
    lengths, truncated = rollout_lengths(generated, [2, 3], max_new_tokens=4)
    assert lengths.tolist() == [2, 4, 1, 4]
    assert truncated.tolist() == [False, True, False, False]


def test_truncation_at_cap(tokenizer):
    model = make_model(zero_weights=True)
    config = SamplingConfig(num_rollouts=8, max_new_tokens=3, seed=0)

    results = sample_rollouts(model, tokenizer, PROMPTS, config)

    for result in results:
        stats = result.stats
        assert bool((stats.lengths <= 3).all())
        assert bool((stats.lengths[stats.truncated] == 3).all())
    # P(no end in 3 steps) = (1 - 1/V)^3: nearly all rollouts are truncated.
    assert sum(int(r.stats.truncated.sum()) for r in results) >= 20


def test_batching_and_padding_keep_figures_valid(tokenizer, tiny_model):
    one_by_one = SamplingConfig(num_rollouts=4, max_new_tokens=10, seed=9, batch_size=4)
    together = SamplingConfig(num_rollouts=4, max_new_tokens=10, seed=9, batch_size=64)

    separate = sample_rollouts(tiny_model, tokenizer, PROMPTS, one_by_one)
    batched = sample_rollouts(tiny_model, tokenizer, PROMPTS, together)

    assert [r.prompt for r in separate] == PROMPTS
    assert [r.prompt for r in batched] == PROMPTS
    for result in batched:
        assert result.stats.num_rollouts == 4
        assert result.step_entropies.shape[0] == 4
        # Masked positions after each rollout's end hold 0.
        for row, length in enumerate(result.stats.lengths.tolist()):
            assert float(result.step_entropies[row, length:].abs().sum()) == 0.0
        torch.testing.assert_close(result.step_entropies.double().sum(dim=1), result.stats.entropy_sums, rtol=1e-5, atol=1e-5)


def test_same_seed_same_rollouts(tokenizer, tiny_model):
    config = SamplingConfig(num_rollouts=4, max_new_tokens=10, seed=11)
    first = sample_rollouts(tiny_model, tokenizer, PROMPTS, config)
    second = sample_rollouts(tiny_model, tokenizer, PROMPTS, config)
    assert [r.texts for r in first] == [r.texts for r in second]
    for a, b in zip(first, second):
        assert torch.equal(a.stats.entropy_sums, b.stats.entropy_sums)


def test_global_state_untouched(tokenizer, tiny_model):
    tiny_model.train()
    tokenizer.padding_side = "right"
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(7)
    torch_state = torch.get_rng_state()
    python_state = random.getstate()
    numpy_state = np.random.get_state()

    sample_rollouts(tiny_model, tokenizer, PROMPTS, SamplingConfig(num_rollouts=3, max_new_tokens=6, seed=0))

    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert tiny_model.training
    assert tokenizer.padding_side == "right"


def test_model_generation_defaults_do_not_change_policy(tokenizer):
    # A model whose own generation config sets top_k and a temperature is still sampled
    # with the monitor's policy: uniform logits give h_t = log V.
    model = make_model(zero_weights=True)
    model.generation_config.top_k = 3
    model.generation_config.temperature = 0.5
    model.generation_config.do_sample = True

    result = sample_rollouts(model, tokenizer, PROMPTS[:1], SamplingConfig(num_rollouts=3, max_new_tokens=5))[0]

    torch.testing.assert_close(
        result.stats.entropy_rates, torch.full((3,), math.log(VOCAB_SIZE), dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_rollouts"):
        SamplingConfig(num_rollouts=1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)


def test_entropy_includes_generation_config_processors(tokenizer, tiny_model):
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    from canopy_monitor.sampling import build_warpers

    tiny_model.generation_config.repetition_penalty = 1.5
    tiny_model.generation_config.no_repeat_ngram_size = 2
    tiny_model.generation_config.min_new_tokens = 3
    tiny_model.generation_config.suppress_tokens = [5, 6]
    config = SamplingConfig(num_rollouts=6, max_new_tokens=12, temperature=0.8, seed=2, use_chat_template=False)
    prompt_ids = tokenizer("hello world")["input_ids"]

    result = sample_rollouts(tiny_model, tokenizer, [Prompt(text="hello world")], config)[0]

    # The processors in the order of generate's `_get_logits_processor`, then the warpers.
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.5),
            NoRepeatNGramLogitsProcessor(2),
            MinNewTokensLengthLogitsProcessor(len(prompt_ids), 3, torch.tensor([2])),
            SuppressTokensLogitsProcessor([5, 6]),
            *build_warpers(config),
        ]
    )
    for index, rollout_ids in enumerate(result.token_ids):
        assert 2 not in rollout_ids[:3]
        assert 5 not in rollout_ids
        assert 6 not in rollout_ids
        entropy_sum, surprisal_sum = teacher_forced_figures(tiny_model, prompt_ids, rollout_ids, processors)
        assert float(result.stats.entropy_sums[index]) == pytest.approx(entropy_sum, rel=1e-4, abs=1e-5)
        assert float(result.stats.surprisal_sums[index]) == pytest.approx(surprisal_sum, rel=1e-4, abs=1e-5)


UNAPPLIED_FIELDS = {
    "min_p": 0.3,
    "top_h": 0.4,
    "typical_p": 0.5,
    "epsilon_cutoff": 0.02,
    "eta_cutoff": 0.02,
    "guidance_scale": 1.5,
    "token_healing": True,
    "stop_strings": ["."],
}


@pytest.fixture
def fresh_reported_causes(monkeypatch):
    """Forget which unapplied generation fields were already logged in this process."""
    from canopy_monitor.sampling import policy

    monkeypatch.setattr(policy, "_reported_causes", set())


def policy_records(caplog, level):
    return [r for r in caplog.records if r.name == "canopy_monitor.sampling.policy" and r.levelno == level]


def test_unapplied_fields_warn_once(tokenizer, tiny_model, caplog, fresh_reported_causes):
    import logging

    from transformers import WatermarkingConfig

    from canopy_monitor.sampling import build_warpers

    for name, value in UNAPPLIED_FIELDS.items():
        setattr(tiny_model.generation_config, name, value)
    tiny_model.generation_config.watermarking_config = WatermarkingConfig(bias=2.5)
    config = SamplingConfig(num_rollouts=4, max_new_tokens=10, seed=4, use_chat_template=False)
    caplog.set_level(logging.INFO, logger="canopy_monitor.sampling.policy")

    result = sample_rollouts(tiny_model, tokenizer, [Prompt(text="hello world")], config)[0]
    first_warnings = [r.getMessage() for r in policy_records(caplog, logging.WARNING)]
    sample_rollouts(tiny_model, tokenizer, [Prompt(text="hello world")], config)

    assert len(first_warnings) == len(UNAPPLIED_FIELDS) + 1
    for name, value in UNAPPLIED_FIELDS.items():
        matching = [message for message in first_warnings if f"sets {name}={value!r}," in message]
        assert len(matching) == 1, name
        assert "the figures describe sampling without it" in matching[0]
    assert any("watermarking_config=" in message for message in first_warnings)
    assert len(policy_records(caplog, logging.WARNING)) == len(first_warnings)
    # The dropped fields do not act: the figures are those of the monitor's warpers alone.
    prompt_ids = tokenizer("hello world")["input_ids"]
    for index, rollout_ids in enumerate(result.token_ids):
        entropy_sum, _ = teacher_forced_figures(tiny_model, prompt_ids, rollout_ids, build_warpers(config))
        assert float(result.stats.entropy_sums[index]) == pytest.approx(entropy_sum, rel=1e-4, abs=1e-5)


def test_neutral_generation_fields_do_not_warn(tokenizer, tiny_model, caplog, fresh_reported_causes):
    import logging

    generation_config = tiny_model.generation_config
    generation_config.min_p = 0.0
    generation_config.typical_p = 1.0
    generation_config.epsilon_cutoff = 0.0
    generation_config.eta_cutoff = 0.0
    generation_config.guidance_scale = 1.0
    generation_config.num_beams = 1
    generation_config.temperature = 0.7
    generation_config.top_k = 0
    caplog.set_level(logging.INFO, logger="canopy_monitor.sampling.policy")

    sample_rollouts(
        tiny_model, tokenizer, PROMPTS[:1], SamplingConfig(num_rollouts=2, max_new_tokens=3, temperature=0.7)
    )

    assert policy_records(caplog, logging.WARNING) == []
    assert policy_records(caplog, logging.INFO) == []


def test_replaced_sampling_fields_logged_once(tokenizer, tiny_model, caplog, fresh_reported_causes):
    import logging

    tiny_model.generation_config.temperature = 0.6
    tiny_model.generation_config.top_p = 0.9
    tiny_model.generation_config.top_k = 20
    config = SamplingConfig(num_rollouts=2, max_new_tokens=3, top_k=20)
    caplog.set_level(logging.INFO, logger="canopy_monitor.sampling.policy")

    sample_rollouts(tiny_model, tokenizer, PROMPTS[:1], config)
    sample_rollouts(tiny_model, tokenizer, PROMPTS[:1], config)

    messages = [r.getMessage() for r in policy_records(caplog, logging.INFO)]
    assert policy_records(caplog, logging.WARNING) == []
    assert len(messages) == 2
    assert "sets temperature=0.6, but canopy-monitor samples with its own temperature=1.0" in messages[0]
    assert "pass temperature=0.6 in SamplingConfig" in messages[0]
    assert "sets top_p=0.9, but canopy-monitor samples with its own top_p=1.0" in messages[1]


def test_min_length_counts_each_prompt_unpadded(tokenizer):
    # min_length counts the prompt, so it must not count another prompt's padding.
    model = make_model(zero_weights=True)
    model.generation_config.min_length = 4
    model.generation_config.sequence_bias = {(2,): 5.0}  # the end token is likely at every step
    short, long = Prompt(text="hello"), Prompt(text="what is the sum of two plus two ?")
    config = SamplingConfig(num_rollouts=32, max_new_tokens=8, seed=0, batch_size=64, use_chat_template=False)

    short_result, long_result = sample_rollouts(model, tokenizer, [short, long], config)

    # "hello" is 1 token, so the end token is banned for the first 3 generated tokens.
    assert int(short_result.stats.lengths.min()) >= 4
    assert int((long_result.stats.lengths == 1).sum()) >= 10


def test_shared_prefill_matches_repeated_prompts(tokenizer, tiny_model, monkeypatch):
    # Running each prompt once and copying its cache must sample exactly what
    # `generate` samples when it repeats every prompt for each rollout.
    from canopy_monitor.sampling import sampler

    config = SamplingConfig(num_rollouts=4, max_new_tokens=10, seed=5, batch_size=8)
    monkeypatch.setattr(sampler, "decode_prompts", lambda *args, **kwargs: None)  # sample with `generate`
    shared = sample_rollouts(tiny_model, tokenizer, PROMPTS, config)
    monkeypatch.setattr(sampler, "shared_prefill", lambda *args: None)
    repeated = sample_rollouts(tiny_model, tokenizer, PROMPTS, config)

    for with_cache, without_cache in zip(shared, repeated):
        assert with_cache.token_ids == without_cache.token_ids
        assert torch.allclose(with_cache.step_entropies, without_cache.step_entropies, atol=1e-5)
        assert torch.allclose(with_cache.stats.surprisal_sums, without_cache.stats.surprisal_sums, atol=1e-4)


def test_shared_prefill_caches_prompt_once_per_rollout(tokenizer, tiny_model):
    from canopy_monitor.sampling.decoder import left_pad
    from canopy_monitor.sampling.sampler import shared_prefill

    input_ids, attention_mask = left_pad([[5, 6, 7], [8, 9]], 0, "cpu")
    tiny_model.eval()

    with torch.no_grad():
        repeated_ids, repeated_mask, model_kwargs = shared_prefill(tiny_model, input_ids, attention_mask, 3)

    assert repeated_ids.tolist() == [[5, 6, 7]] * 3 + [[0, 8, 9]] * 3
    assert repeated_mask.tolist() == [[1, 1, 1]] * 3 + [[0, 1, 1]] * 3
    (cache,) = model_kwargs.values()
    # Every prompt token but the last is cached, for 2 prompts x 3 rollouts.
    assert cache.get_seq_length() == 2
    assert cache.layers[0].keys.shape[0] == 6


def test_shared_prefill_skips_single_token_prompts(tiny_model):
    from canopy_monitor.sampling.sampler import shared_prefill

    assert shared_prefill(tiny_model, torch.tensor([[5], [6]]), torch.ones(2, 1, dtype=torch.long), 4) is None
