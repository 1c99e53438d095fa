"""The sampler's own decoding loop (`decode_prompts`) and the batch-size chooser under unusual set-ups.

The reference for every rollout is `generate` itself. The rollout's tokens are forced
through `PolicyGeneration.generate` one prompt at a time, with the step-entropy
recorder just before the forcing processor. So `generate` builds the processors of the
model's generation config, and the loop must reproduce the figures it records for the
same tokens.
"""

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

from canopy_monitor.config import SamplingConfig
from canopy_monitor.prompts import Prompt, PromptError
from canopy_monitor.sampling import decoder, memory, sample_rollouts, sampler
from canopy_monitor.sampling.recorder import StepEntropyRecorder
from canopy_monitor.sampling.sampler import PolicyGeneration

from conftest import VOCAB_WORDS, make_model, make_tokenizer

EOS = 2
VOCAB_SIZE = len(VOCAB_WORDS)
# Encoded lengths 9, 1, 4 and 20 without the chat template.
PROMPTS = [
    Prompt(text="what is the sum of two plus two ?"),
    Prompt(text="hello"),
    Prompt(text="tell me a story"),
    Prompt(text=" ".join(f"w{i}" for i in range(1, 21))),
]


class _ForcedPath(LogitsProcessor):
    """Replace the scores so that `generate` emits `path` token by token."""

    def __init__(self, prompt_width: int, path: list[int]) -> None:
        self.prompt_width = prompt_width
        self.path = path

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_width
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.path[step]] = 0.0
        return forced


def generate_figures(model, tokenizer, config, prompt, path):
    """Return `generate`'s step entropies `[N]` and token log-probabilities `[N]` along `path`."""
    policy = PolicyGeneration.build(model, tokenizer, config)
    prompt_ids = policy.encode(model, tokenizer, [prompt])[0]
    recorder = StepEntropyRecorder()
    device = next(model.parameters()).device
    with policy.session(model):
        sequences = policy.generate(
            model,
            torch.tensor([prompt_ids], device=device),
            torch.ones((1, len(prompt_ids)), dtype=torch.long, device=device),
            num_return_sequences=1,
            after_policy=[recorder.logits_processor, _ForcedPath(len(prompt_ids), path)],
            stopping_criteria=[recorder.stopping_criteria],
        )
    assert sequences[0, len(prompt_ids) : len(prompt_ids) + len(path)].tolist() == path
    step_entropies, token_logprobs = recorder.stacked()
    return step_entropies[0, : len(path)].cpu(), token_logprobs[0, : len(path)].cpu()


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


def assert_matches_generate(model, tokenizer, prompts, config, *, atol=2e-5):
    """Sample `prompts` and check every rollout's step entropies and surprisal against `generate`."""
    results = sample_rollouts(model, tokenizer, prompts, config)

    for prompt, result in zip(prompts, results):
        assert result.stats.num_rollouts == config.num_rollouts
        for index, path in enumerate(result.token_ids):
            assert 1 <= len(path) <= config.max_new_tokens
            step_entropies, token_logprobs = generate_figures(model, tokenizer, config, prompt, path)
            torch.testing.assert_close(result.step_entropies[index, : len(path)], step_entropies, rtol=0, atol=atol)
            assert float(result.stats.surprisal_sums[index]) == pytest.approx(-float(token_logprobs.double().sum()), abs=10 * atol)
            assert float(result.stats.entropy_sums[index]) == pytest.approx(float(step_entropies.double().sum()), abs=10 * atol)
    return results


def ending_model(seed: int = 6, boost: float = 0.6, **kwargs):
    """A tiny Llama whose end token is likelier than the rest, so rollouts end at many lengths."""
    model = make_model(seed=seed, **kwargs)
    with torch.no_grad():
        model.lm_head.weight[EOS] += boost
    return model


def lengths_of(results):
    return [len(ids) for result in results for ids in result.token_ids]


# The loop against `generate`


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 7, 16, 100])
def test_loop_matches_generate_for_batch_sizes(tokenizer, decoder_runs, batch_size):
    # Four rollouts of each of the prompts of 9, 1, 4 and 20 tokens, with batch sizes below
    # one prompt, not a multiple of it, and above all 16 rollouts.
    model = ending_model()
    config = SamplingConfig(num_rollouts=4, max_new_tokens=9, seed=1, batch_size=batch_size, use_chat_template=False)

    results = assert_matches_generate(model, tokenizer, PROMPTS, config)

    assert decoder_runs == [True]
    lengths = lengths_of(results)
    assert min(lengths) < max(lengths)


GENERATION_FIELDS = {
    "min_new_tokens": {"min_new_tokens": 3},
    "min_length": {"min_length": 6},
    "forced_eos": {"forced_eos_token_id": EOS},
    "forced_eos_not_an_end": {"forced_eos_token_id": 3},
    "decay_penalty": {"exponential_decay_length_penalty": (2, 1.5)},
    "suppress": {"suppress_tokens": [4, 5, 6]},
    "begin_suppress": {"begin_suppress_tokens": [EOS, 7]},
    "bad_words": {"bad_words_ids": [[8], [9, 10], [36, 37]]},
    "sequence_bias": {"sequence_bias": {(EOS,): 3.0, (9, 10): -2.0, (11,): 4.0}},
    "no_repeat_ngram": {"no_repeat_ngram_size": 2},
    "repetition_penalty": {"repetition_penalty": 1.8},
    "repetition_reward": {"repetition_penalty": 0.5},
    "all_together": {
        "repetition_penalty": 1.3,
        "no_repeat_ngram_size": 3,
        "min_new_tokens": 2,
        "suppress_tokens": [4],
        "begin_suppress_tokens": [5],
        "bad_words_ids": [[9, 10]],
        "sequence_bias": {(11,): 2.0},
        "exponential_decay_length_penalty": (3, 1.2),
        "forced_eos_token_id": EOS,
    },
}


@pytest.mark.parametrize("fields", GENERATION_FIELDS.values(), ids=GENERATION_FIELDS.keys())
@pytest.mark.parametrize("batch_size", [3, 16])
def test_loop_matches_generate_with_config_processors(tokenizer, decoder_runs, fields, batch_size):
    model = ending_model()
    for name, value in fields.items():
        setattr(model.generation_config, name, value)
    config = SamplingConfig(
        num_rollouts=4, max_new_tokens=9, seed=1, batch_size=batch_size, temperature=0.9, top_k=20, use_chat_template=False
    )

    results = assert_matches_generate(model, tokenizer, PROMPTS, config)

    assert decoder_runs == [True]
    if "min_new_tokens" in fields:
        assert min(lengths_of(results)) >= fields["min_new_tokens"] + 1
    if fields.get("forced_eos_token_id") == EOS:
        assert all(ids[-1] == EOS for result in results for ids in result.token_ids)


def fuzz_cases(count: int = 12):
    """Seeded random mixes of prompt counts, lengths, M, T, rows, processors and policies."""
    rng = random.Random(0)
    words = ["what", "is", "the", "a", "of", "to", "and", "hello", "world", "story", "w1", "w5", "w9", "python"]
    cases = []
    for case in range(count):
        prompts = [
            Prompt(text=" ".join(rng.choice(words) for _ in range(rng.choice([1, 1, 2, 5, 12, 30]))))
            for _ in range(rng.randint(1, 7))
        ]
        fields = {}
        if rng.random() < 0.4:
            fields["repetition_penalty"] = rng.choice([0.7, 1.4])
        if rng.random() < 0.3:
            fields["no_repeat_ngram_size"] = rng.choice([1, 2, 3])
        if rng.random() < 0.3:
            fields["min_new_tokens"] = rng.randint(1, 4)
        if rng.random() < 0.3:
            fields["sequence_bias"] = {(EOS,): rng.uniform(-2.0, 3.0)}
        if rng.random() < 0.2:
            fields["forced_eos_token_id"] = EOS
        policy = rng.choice([{}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8}, {"temperature": 1.5, "top_k": 10, "top_p": 0.95}])
        settings = dict(num_rollouts=rng.randint(2, 6), max_new_tokens=rng.randint(1, 12), batch_size=rng.randint(1, 40))
        cases.append(pytest.param(case, prompts, fields, {**policy, **settings}, id=f"case{case}"))
    return cases


@pytest.mark.parametrize("case, prompts, fields, settings", fuzz_cases())
def test_loop_matches_generate_on_random_mixes(tokenizer, decoder_runs, case, prompts, fields, settings):
    model = ending_model(seed=case, boost=0.8)
    for name, value in fields.items():
        setattr(model.generation_config, name, value)
    config = SamplingConfig(seed=case, use_chat_template=False, **settings)

    assert_matches_generate(model, tokenizer, prompts, config)

    assert decoder_runs == [True]


def test_loop_cap_of_one_token(tokenizer, decoder_runs):
    config = SamplingConfig(num_rollouts=4, max_new_tokens=1, seed=1, batch_size=5, use_chat_template=False)

    results = assert_matches_generate(ending_model(), tokenizer, PROMPTS, config)

    assert decoder_runs == [True]
    assert lengths_of(results) == [1] * 16
    for result in results:
        assert result.step_entropies.shape == (4, 1)
        for ids, truncated in zip(result.token_ids, result.stats.truncated.tolist()):
            assert truncated == (ids[0] != EOS)


def test_loop_every_rollout_ends_at_first_step(tokenizer, decoder_runs):
    model = make_model(seed=6)
    model.generation_config.sequence_bias = {(EOS,): 50.0}
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=5, use_chat_template=False)

    results = assert_matches_generate(model, tokenizer, PROMPTS, config)

    assert decoder_runs == [True]
    assert all(ids == [EOS] for result in results for ids in result.token_ids)
    assert not any(bool(result.stats.truncated.any()) for result in results)


def test_loop_no_rollout_ends(tokenizer, decoder_runs):
    model = ending_model()
    model.generation_config.suppress_tokens = [EOS]
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=5, use_chat_template=False)

    results = assert_matches_generate(model, tokenizer, PROMPTS, config)

    assert decoder_runs == [True]
    assert lengths_of(results) == [8] * 16
    assert all(bool(result.stats.truncated.all()) for result in results)


def test_loop_several_end_ids(tokenizer, decoder_runs):
    model = make_model(seed=6, eos_token_id=[2, 3, 7])
    with torch.no_grad():
        model.lm_head.weight[[2, 3, 7]] += 0.6
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=5, use_chat_template=False)

    results = assert_matches_generate(model, tokenizer, PROMPTS, config)

    assert decoder_runs == [True]
    endings = {ids[-1] for result in results for ids, cut in zip(result.token_ids, result.stats.truncated.tolist()) if not cut}
    assert len(endings) >= 2
    assert endings <= {2, 3, 7}
    for result in results:
        for ids in result.token_ids:
            assert not {2, 3, 7} & set(ids[:-1])


def test_loop_top_k_one_is_greedy(tokenizer, decoder_runs):
    config = SamplingConfig(num_rollouts=5, max_new_tokens=8, seed=1, batch_size=7, top_k=1, use_chat_template=False)

    results = assert_matches_generate(make_model(seed=6), tokenizer, PROMPTS, config)

    assert decoder_runs == [True]
    for result in results:
        assert len({tuple(ids) for ids in result.token_ids}) == 1
        assert float(result.stats.entropy_sums.abs().max()) == 0.0
        assert float(result.stats.surprisal_sums.abs().max()) == 0.0


def test_loop_bfloat16_model(tokenizer, decoder_runs):
    model = ending_model().to(torch.bfloat16)
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=5, use_chat_template=False)

    # The loop batches rows of several prompts in one bfloat16 forward pass, the
    # reference runs one row, so the logits agree only to bfloat16 precision.
    results = assert_matches_generate(model, tokenizer, PROMPTS, config, atol=5e-2)

    assert decoder_runs == [True]
    for result in results:
        assert bool(torch.isfinite(result.step_entropies).all())
        assert result.step_entropies.dtype == torch.float32


def test_loop_lora_model(tokenizer, decoder_runs):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(ending_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=5, use_chat_template=False)

    assert_matches_generate(model, tokenizer, PROMPTS, config)

    assert decoder_runs == [True]


def tiny_config_kwargs():
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def finish_model(model):
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS] += 0.6
    return model


def mistral(sliding_window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return finish_model(MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **tiny_config_kwargs())))


@pytest.mark.parametrize("sliding_window", [4, 1000])
def test_sliding_window_mistral_uses_generate(tokenizer, decoder_runs, sliding_window):
    # Mistral's cache layers slide, so the loop must hand the prompts to `generate`,
    # whatever the window's size against the prompts.
    from transformers import DynamicCache

    model = mistral(sliding_window)
    assert {type(layer).__name__ for layer in DynamicCache(config=model.config).layers} == {"DynamicSlidingWindowLayer"}
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=5, use_chat_template=False)

    assert_matches_generate(model, tokenizer, PROMPTS, config)

    assert decoder_runs == [False]


def test_mistral_without_window_uses_loop(tokenizer, decoder_runs):
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=5, use_chat_template=False)

    assert_matches_generate(mistral(None), tokenizer, PROMPTS, config)

    assert decoder_runs == [True]


@pytest.mark.parametrize("use_sliding_window", [False, True])
def test_qwen2_sliding_layers_choose_path(tokenizer, decoder_runs, use_sliding_window):
    # With the window on, only the second layer slides, and one such layer is enough to
    # send the prompts to `generate`.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = finish_model(
        Qwen2ForCausalLM(
            Qwen2Config(use_sliding_window=use_sliding_window, sliding_window=4, max_window_layers=1, **tiny_config_kwargs())
        )
    )
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=5, use_chat_template=False)

    assert_matches_generate(model, tokenizer, PROMPTS, config)

    assert decoder_runs == [not use_sliding_window]


def test_loop_gpt2_model(tokenizer, decoder_runs):
    # GPT-2 learns absolute positions, so each row must get its own position ids, not the batch's.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2_config = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=1, eos_token_id=EOS)
    model = finish_model(GPT2LMHeadModel(gpt2_config))
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=5, use_chat_template=False)

    assert_matches_generate(model, tokenizer, PROMPTS, config)

    assert decoder_runs == [True]


def test_training_mode_model_samples_as_eval(tokenizer, decoder_runs):
    # Heavy dropout would change every draw if the model were sampled in training mode.
    model = ending_model()
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.9
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=5, use_chat_template=False)
    model.eval()
    in_eval = sample_rollouts(model, tokenizer, PROMPTS, config)
    model.train()

    in_training = sample_rollouts(model, tokenizer, PROMPTS, config)

    assert model.training
    assert all(module.training for module in model.modules())
    assert [r.token_ids for r in in_training] == [r.token_ids for r in in_eval]
    for a, b in zip(in_training, in_eval):
        assert torch.equal(a.step_entropies, b.step_entropies)
    assert decoder_runs == [True, True]


# Reproducibility and the distribution of the draws


def test_same_seed_same_rollouts_through_loop(tokenizer, decoder_runs):
    model = ending_model()
    config = SamplingConfig(num_rollouts=4, max_new_tokens=9, seed=5, batch_size=5, use_chat_template=False)

    first = sample_rollouts(model, tokenizer, PROMPTS, config)
    second = sample_rollouts(model, tokenizer, PROMPTS, config)
    other_seed = sample_rollouts(model, tokenizer, PROMPTS, dataclasses.replace(config, seed=6))

    assert decoder_runs == [True, True, True]
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    for a, b in zip(first, second):
        assert torch.equal(a.step_entropies, b.step_entropies)
        assert torch.equal(a.stats.surprisal_sums, b.stats.surprisal_sums)
    assert [r.token_ids for r in first] != [r.token_ids for r in other_seed]


def test_loop_leaves_global_random_states(tokenizer, decoder_runs):
    model = ending_model()
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(7)
    torch_state = torch.get_rng_state()
    python_state = random.getstate()
    numpy_state = np.random.get_state()

    sample_rollouts(model, tokenizer, PROMPTS, SamplingConfig(num_rollouts=3, max_new_tokens=6, seed=0, batch_size=4))

    assert decoder_runs == [True]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_loop_surprisal_matches_entropy_on_average(tokenizer, decoder_runs):
    # Tokens drawn from the recorded distribution give E[-log pi(y_t)] = E[h_t], so the
    # mean of (surprisal sum - entropy sum) over rollouts is 0 within sampling error.
    # Draws from another distribution (another row's, say) shift it away from 0 in general.
    model = ending_model(seed=3, boost=1.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    config = SamplingConfig(num_rollouts=60, max_new_tokens=8, seed=2, batch_size=37, temperature=0.9, use_chat_template=False)

    results = sample_rollouts(model, tokenizer, PROMPTS, config)

    assert decoder_runs == [True]
    differences = torch.cat([r.stats.surprisal_sums - r.stats.entropy_sums for r in results])  # [240]
    standard_error = float(differences.std()) / math.sqrt(differences.numel())
    assert standard_error > 0
    assert abs(float(differences.mean())) < 4 * standard_error


def test_loop_first_tokens_follow_prompt_distribution(tokenizer, decoder_runs):
    from scipy.stats import chisquare

    model = make_model(seed=8)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    prompts = [PROMPTS[1], PROMPTS[3]]
    config = SamplingConfig(num_rollouts=400, max_new_tokens=1, seed=4, batch_size=300, use_chat_template=False)

    results = sample_rollouts(model, tokenizer, prompts, config)

    assert decoder_runs == [True]
    for prompt, result in zip(prompts, results):
        prompt_ids = tokenizer(prompt.text)["input_ids"]
        with torch.no_grad():
            probabilities = torch.softmax(model(torch.tensor([prompt_ids])).logits[0, -1].double(), dim=-1)  # [V]
        counts = torch.bincount(torch.tensor([ids[0] for ids in result.token_ids]), minlength=VOCAB_SIZE).double()
        # Pool the rare tokens so that every expected count is at least 5.
        expected = probabilities * 400
        common = expected >= 5
        observed = torch.cat([counts[common], counts[~common].sum()[None]])
        predicted = torch.cat([expected[common], expected[~common].sum()[None]])
        assert chisquare(observed.numpy(), predicted.numpy() * observed.sum().item() / predicted.sum().item()).pvalue > 1e-3


# Odd prompts


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_prompt_rejected(tokenizer, text):
    config = SamplingConfig(num_rollouts=2, max_new_tokens=4, use_chat_template=False)

    with pytest.raises(PromptError):
        sample_rollouts(make_model(), tokenizer, [Prompt(text=text)], config)


def test_identical_prompts_sampled_independently(tokenizer, decoder_runs):
    model = ending_model()
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=1, batch_size=6, use_chat_template=False)
    prompts = [PROMPTS[1]] * 5

    results = assert_matches_generate(model, tokenizer, prompts, config)

    assert decoder_runs == [True]
    assert len({tuple(map(tuple, result.token_ids)) for result in results}) > 1


def test_forced_bos_independent_of_batch(tokenizer):
    model = mistral(64)
    model.generation_config.forced_bos_token_id = 5
    config = SamplingConfig(num_rollouts=4, max_new_tokens=4, seed=3, batch_size=8, use_chat_template=False)

    alone = sample_rollouts(model, tokenizer, [PROMPTS[1]], config)[0]
    batched = sample_rollouts(model, tokenizer, [PROMPTS[1], PROMPTS[0]], config)[0]

    assert [ids[0] for ids in alone.token_ids] == [5] * 4
    assert [ids[0] for ids in batched.token_ids] == [5] * 4


# Batch size from the free memory


class _ConfigOnly(torch.nn.Module):
    """A module with one float parameter and a bare config object holding `settings`."""

    def __init__(self, settings: dict, dtype=torch.float32) -> None:
        super().__init__()
        self.config = type("BareConfig", (), dict(settings))()
        self.weight = torch.nn.Parameter(torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({}, None),
        ({"num_hidden_layers": 2}, None),
        ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32}, 2 * 2 * 4 * 8 * 4),
        ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32, "num_key_value_heads": None, "head_dim": None}, 2 * 2 * 4 * 8 * 4),
        ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32, "num_key_value_heads": 1, "head_dim": 64}, 2 * 2 * 1 * 64 * 4),
        ({"num_hidden_layers": 2, "num_attention_heads": 0, "hidden_size": 32}, None),
        ({"num_hidden_layers": 2.0, "num_attention_heads": 4, "hidden_size": 32}, None),
        ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 2}, None),
    ],
    ids=["empty", "layers-only", "no-kv-heads", "none-fields", "head-dim", "zero-heads", "float-layers", "head-dim-zero"],
)
def test_cache_bytes_odd_configs(settings, expected):
    model = _ConfigOnly(settings)

    assert memory.cache_bytes_per_position(model) == expected
    rows = memory.batch_rows(model, num_rollouts=3, prompt_width=5, max_new_tokens=7, device=torch.device("cpu"))
    assert rows % 3 == 0
    assert 3 <= rows <= memory.MAX_ROWS["cpu"]


def test_cache_bytes_of_real_configs():
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = make_model()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=2, n_positions=64))

    # 2 (keys and values) x 2 layers x 2 heads x 16 per head x 4 bytes.
    assert memory.cache_bytes_per_position(llama) == 512
    assert memory.cache_bytes_per_position(gpt2) == 512
    assert memory.cache_bytes_per_position(llama.to(torch.bfloat16)) == 256


def test_cache_bytes_per_layer_head_list():
    model = _ConfigOnly({"num_hidden_layers": 2, "num_attention_heads": [4, 4], "hidden_size": 32})

    assert memory.cache_bytes_per_position(model) is None


@pytest.mark.parametrize("error", [RuntimeError("no /proc"), OSError("denied"), ImportError("no psutil")])
def test_free_memory_unreadable_falls_back(monkeypatch, error):
    import psutil

    def unreadable():
        raise error

    monkeypatch.setattr(psutil, "virtual_memory", unreadable)

    assert memory.free_memory(torch.device("cpu")) is None
    assert memory.batch_rows(make_model(), num_rollouts=4, prompt_width=5, max_new_tokens=7, device=torch.device("cpu")) == memory.FALLBACK_ROWS
    assert memory.batch_rows(make_model(), num_rollouts=5, prompt_width=5, max_new_tokens=7, device=torch.device("cpu")) == 30


@pytest.mark.parametrize("free, num_rollouts, expected", [(0, 4, 4), (1, 7, 7), (10**15, 4, 64), (10**15, 100, 100), (10**15, 48, 48)])
def test_batch_rows_bounds(monkeypatch, free, num_rollouts, expected):
    monkeypatch.setattr(memory, "free_memory", lambda device: free)

    rows = memory.batch_rows(make_model(), num_rollouts=num_rollouts, prompt_width=9, max_new_tokens=10, device=torch.device("cpu"))

    assert rows == expected


def test_unreadable_memory_still_samples(tokenizer, monkeypatch, decoder_runs):
    monkeypatch.setattr(memory, "free_memory", lambda device: None)
    config = SamplingConfig(num_rollouts=4, max_new_tokens=6, seed=0, use_chat_template=False)

    results = sample_rollouts(ending_model(), tokenizer, PROMPTS, config)

    assert decoder_runs == [True]
    assert [r.stats.num_rollouts for r in results] == [4] * 4


def test_resolved_batch_size_ignores_later_free_memory(tokenizer, monkeypatch):
    # The draws follow the rows, so a run fixes the rows once (the callback does at its
    # first point) and later points draw the same random numbers whatever memory is free.
    from canopy_monitor.sampling.sampler import resolve_batch_size

    model = ending_model(seed=4, boost=0.5)
    config = SamplingConfig(num_rollouts=4, max_new_tokens=10, seed=3, use_chat_template=False)
    monkeypatch.setattr(memory, "free_memory", lambda device: 10**12)
    resolved = resolve_batch_size(model, tokenizer, PROMPTS, config)
    rollouts = []
    for free in (10**12, 60_000):
        monkeypatch.setattr(memory, "free_memory", lambda device, free=free: free)
        rollouts.append([r.token_ids for r in sample_rollouts(model, tokenizer, PROMPTS, resolved)])

    assert resolved.batch_size == 64
    assert rollouts[0] == rollouts[1]
