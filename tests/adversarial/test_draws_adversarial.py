"""Inverse transform sampling from per-prompt uniforms (`sampling.draws`) under hard cases.

The exact reference distribution of a step is built here from transformers' own
processors, applied to the tiny model's logits in float64, independently of the
sampler's code path.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from canopy_monitor.config import SamplingConfig
from canopy_monitor.prompts import Prompt
from canopy_monitor.sampling import decoder, sample_rollouts, sampler
from canopy_monitor.sampling.draws import inverse_transform_sample, prompt_seed, rollout_uniforms

from conftest import VOCAB_WORDS, make_model

VOCAB_SIZE = len(VOCAB_WORDS)
PROMPTS = [
    Prompt(text="what is the sum of two plus two ?"),
    Prompt(text="hello"),
    Prompt(text="tell me a story"),
    Prompt(text="how do i write a python function"),
]


@pytest.fixture
def decoder_runs(monkeypatch):
    """Record, for each `decode_prompts` call of the sampler, whether the loop sampled (not `generate`)."""
    runs = []
    real_decode = decoder.decode_prompts

    def spy(*args, **kwargs):
        run = real_decode(*args, **kwargs)
        runs.append(run is not None)
        return run

    monkeypatch.setattr(sampler, "decode_prompts", spy)
    return runs


def sharp_model(seed: int = 3, scale: float = 3.0):
    """A tiny Llama with sharper logits than the random one, so filters remove real mass."""
    model = make_model(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def exact_probabilities(model, input_ids: list[int], processors: LogitsProcessorList) -> torch.Tensor:
    """Return the processed next-token distribution `[V]` after `input_ids`, in float64."""
    ids = torch.tensor([input_ids])  # [1, n]
    with torch.no_grad():
        logits = model(ids).logits[:, -1].double()  # [1, V]
    return torch.softmax(processors(ids, logits), dim=-1)[0]


def assert_follows(counts: torch.Tensor, probabilities: torch.Tensor) -> None:
    """Check `counts` `[V]` against `probabilities` `[V]` with a chi-square test, rare tokens pooled."""
    total = float(counts.sum())
    expected = probabilities * total
    common = expected >= 5
    observed = torch.cat([counts[common], counts[~common].sum()[None]])
    predicted = torch.cat([expected[common], expected[~common].sum()[None]])
    if float(predicted[-1]) == 0.0:
        observed, predicted = observed[:-1], predicted[:-1]
    assert chisquare(observed.numpy(), predicted.numpy()).pvalue > 1e-3


# The inverse transform itself


def test_zero_probability_tokens_never_drawn_at_boundaries():
    probabilities = torch.tensor([0.0, 0.25, 0.0, 0.25, 0.5, 0.0, 0.0], dtype=torch.float64)
    logprobs = probabilities.log().float()[None, :]  # [1, V]
    boundaries = [0.0, 0.25, 0.5, 1.0 - 2**-53, math.nextafter(0.25, 0.0), math.nextafter(0.5, 1.0)]

    for uniform in boundaries:
        token = int(inverse_transform_sample(logprobs, torch.tensor([uniform], dtype=torch.float64))[0])
        assert probabilities[token] > 0, (uniform, token)


def test_inverse_transform_matches_cumulative_sums():
    logprobs = torch.log_softmax(torch.tensor([[0.3, -1.0, 2.0, float("-inf"), 0.0]]), dim=-1)  # [1, V]
    probabilities = logprobs.double().exp()[0]
    uniforms = torch.linspace(0.0, 1.0 - 1e-12, 10001, dtype=torch.float64)  # [B]

    tokens = inverse_transform_sample(logprobs.expand(len(uniforms), -1), uniforms)

    shares = torch.bincount(tokens, minlength=5).double() / len(uniforms)
    assert int((tokens == 3).sum()) == 0
    torch.testing.assert_close(shares, probabilities / probabilities.sum(), rtol=0, atol=2e-4)


def test_single_token_row_always_drawn():
    logprobs = torch.full((3, 6), float("-inf"))
    logprobs[:, 5] = 0.0
    uniforms = torch.tensor([0.0, 0.5, 1.0 - 2**-53], dtype=torch.float64)

    assert inverse_transform_sample(logprobs, uniforms).tolist() == [5, 5, 5]


# Seeds and keys


def test_largest_seed_draws_reproducible_uniforms():
    first = rollout_uniforms(2**63 - 1, 3, 4, 5)
    second = rollout_uniforms(2**63 - 1, 3, 4, 5)

    assert first.dtype == torch.float64
    assert first.shape == (4, 5)
    assert torch.equal(first, second)
    assert not torch.equal(first, rollout_uniforms(2**63 - 1, 4, 4, 5))


def test_prompt_seeds_unique_within_one_seed():
    for seed in (0, 1, 2**32 - 1, 2**32, 2**63 - 1):
        seeds = {prompt_seed(seed, key) for key in range(2000)}
        assert len(seeds) == 2000, seed


def test_prompt_seeds_unique_across_seeds_and_keys():
    # `SeedSequence([seed, key])` splits an integer above 2**32 into 32-bit words and
    # pads a short entropy list with zeros. So (5, 1) and (5 + 2**32, 0) both become
    # the words [5, 1], and two runs with different seeds share a prompt's uniforms.
    assert prompt_seed(5, 1) != prompt_seed(5 + 2**32, 0)
    assert prompt_seed(0, 2**32) != prompt_seed(0, 0)


def test_negative_seed_or_key_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        prompt_seed(-1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        prompt_seed(0, -1)


# Draws against the exact processed distribution


def test_first_tokens_follow_filtered_distribution(tokenizer, decoder_runs):
    model = sharp_model()
    model.generation_config.repetition_penalty = 1.8
    config = SamplingConfig(
        num_rollouts=3000, max_new_tokens=1, temperature=0.7, top_k=12, top_p=0.9, seed=11, use_chat_template=False
    )
    prompt = PROMPTS[0]
    prompt_ids = tokenizer(prompt.text)["input_ids"]
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.8),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(12),
            TopPLogitsWarper(0.9),
        ]
    )

    result = sample_rollouts(model, tokenizer, [prompt], config)[0]

    assert decoder_runs == [True]
    probabilities = exact_probabilities(model, prompt_ids, processors)
    counts = torch.bincount(torch.tensor([ids[0] for ids in result.token_ids]), minlength=VOCAB_SIZE).double()
    assert int((probabilities > 0).sum()) < 12
    assert float(counts[probabilities == 0].sum()) == 0.0
    assert_follows(counts, probabilities)


def test_second_tokens_follow_penalised_distribution(tokenizer, decoder_runs):
    # The repetition penalty at the second step also acts on the first sampled token,
    # so this checks that each row's processors see that row's own tokens.
    model = sharp_model(seed=5, scale=2.0)
    model.generation_config.repetition_penalty = 3.0
    config = SamplingConfig(num_rollouts=3000, max_new_tokens=2, top_k=8, seed=2, use_chat_template=False)
    prompt = PROMPTS[2]
    prompt_ids = tokenizer(prompt.text)["input_ids"]
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(3.0), TopKLogitsWarper(8)])

    result = sample_rollouts(model, tokenizer, [prompt], config)[0]

    assert decoder_runs == [True]
    firsts = torch.tensor([ids[0] for ids in result.token_ids])
    common_first = int(torch.bincount(firsts).argmax())
    assert common_first != 2  # the end token stops the rollout, leaving no second token
    seconds = torch.tensor([ids[1] for ids in result.token_ids if ids[0] == common_first])
    assert len(seconds) > 300
    probabilities = exact_probabilities(model, prompt_ids + [common_first], processors)
    counts = torch.bincount(seconds, minlength=VOCAB_SIZE).double()
    assert float(counts[probabilities == 0].sum()) == 0.0
    assert_follows(counts, probabilities)


# Rollouts independent of batching


def token_ids(results) -> list[list[list[int]]]:
    return [result.token_ids for result in results]


def test_rollouts_same_for_every_batch_size(tokenizer, decoder_runs):
    model = sharp_model(scale=1.5)
    reference = None

    for batch_size in (1, 3, 4, 7, 64):
        config = SamplingConfig(num_rollouts=4, max_new_tokens=10, seed=9, batch_size=batch_size, use_chat_template=False)
        rollouts = token_ids(sample_rollouts(model, tokenizer, PROMPTS, config))
        if reference is None:
            reference = rollouts
        assert rollouts == reference, batch_size

    assert decoder_runs == [True] * 5


def test_rollouts_same_for_order_and_subset(tokenizer, decoder_runs):
    model = sharp_model(scale=1.5)
    config = SamplingConfig(num_rollouts=4, max_new_tokens=10, seed=9, batch_size=8, use_chat_template=False)
    everything = token_ids(sample_rollouts(model, tokenizer, PROMPTS, config))

    reversed_order = token_ids(sample_rollouts(model, tokenizer, PROMPTS[::-1], config, prompt_keys=[3, 2, 1, 0]))
    odd_share = token_ids(sample_rollouts(model, tokenizer, [PROMPTS[1], PROMPTS[3]], config, prompt_keys=[1, 3]))

    assert reversed_order == everything[::-1]
    assert odd_share == [everything[1], everything[3]]


def test_same_prompt_under_two_keys_differs(tokenizer):
    model = sharp_model(scale=1.5)
    config = SamplingConfig(num_rollouts=6, max_new_tokens=10, seed=9, use_chat_template=False)

    first, second = sample_rollouts(model, tokenizer, [PROMPTS[0], PROMPTS[0]], config)

    assert first.token_ids != second.token_ids


def test_largest_seed_samples(tokenizer, decoder_runs):
    model = sharp_model(scale=1.5)
    config = SamplingConfig(num_rollouts=4, max_new_tokens=6, seed=2**63 - 1, use_chat_template=False)

    first = token_ids(sample_rollouts(model, tokenizer, PROMPTS[:2], config))
    second = token_ids(sample_rollouts(model, tokenizer, PROMPTS[:2], config))

    assert decoder_runs == [True, True]
    assert first == second
    assert all(1 <= len(ids) <= 6 for rollouts in first for ids in rollouts)


def test_equal_weights_give_identical_points(tokenizer):
    config = SamplingConfig(num_rollouts=4, max_new_tokens=10, seed=4, use_chat_template=False)

    first = sample_rollouts(sharp_model(seed=7), tokenizer, PROMPTS, config)
    second = sample_rollouts(sharp_model(seed=7), tokenizer, PROMPTS, config)

    assert token_ids(first) == token_ids(second)
    for one, other in zip(first, second):
        assert torch.equal(one.step_entropies, other.step_entropies)
        assert torch.equal(one.stats.surprisal_sums, other.stats.surprisal_sums)


def test_uniforms_independent_of_device_argument():
    on_default = rollout_uniforms(3, 1, 5, 7)
    on_cpu = rollout_uniforms(3, 1, 5, 7, device="cpu")

    assert torch.equal(on_default, on_cpu)
    assert np.all((on_default.numpy() >= 0.0) & (on_default.numpy() < 1.0))
