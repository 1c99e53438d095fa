"""The exact tree walker against closed forms, and both estimators against the exact tree.

The model has five tokens, so the whole rollout tree of a cap `T <= 5` (and a larger
`T` where top-k prunes it) is walked in milliseconds. Each sampling check repeats the
measurement over independent seeds and divides each error by the estimator's own
standard error. Every `|z|` must stay below 4, and the sum of `z^2` over the seeds
must stay below the 0.999 quantile of a chi-square. So a biased estimator fails, and
so does a standard error that is too small.
"""

import math
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from canopy_monitor.config import SamplingConfig
from canopy_monitor.estimators import estimate_prompt
from canopy_monitor.exact import exact_canopy
from canopy_monitor.prompts import Prompt
from canopy_monitor.sampling import sample_rollouts

WORDS = ["</s>", "<end>", "a", "b", "c"]
PROMPT = Prompt(text="a b c")
SEEDS = range(16)
ROLLOUTS_PER_SEED = 400
Z_LIMIT = 4.0
CHI_SQUARE_QUANTILE = 0.999


def make_word_tokenizer():
    """Build a word-level tokenizer over `WORDS`; `</s>` (0) is the end-of-sequence token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={word: index for index, word in enumerate(WORDS)}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="a")


def make_word_model(seed: int = 0, *, eos_token_id=0, logit_scale: float = 8.0, zero_weights: bool = False, **generation):
    """Build a tiny Llama over `WORDS`.

    `logit_scale` multiplies the output weights, so the policy is peaked and depends on
    the context. With `zero_weights` every logit is 0 and the raw policy is uniform.
    `generation` sets fields of the model's generation config.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        if zero_weights:
            model.lm_head.weight.zero_()
        else:
            model.lm_head.weight.mul_(logit_scale)
    model.generation_config.eos_token_id = eos_token_id
    for name, value in generation.items():
        setattr(model.generation_config, name, value)
    return model


def sampling_config(**policy) -> SamplingConfig:
    policy.setdefault("max_new_tokens", 5)
    return SamplingConfig(num_rollouts=ROLLOUTS_PER_SEED, use_chat_template=False, batch_size=ROLLOUTS_PER_SEED, **policy)


# ---------------------------------------------------------------------------
# The walker against closed forms


def closed_form_uniform(allowed: list[int], ends: list[int]) -> dict:
    """Exact figures of a policy that is uniform over `allowed[t]` tokens at step `t + 1`,
    `ends[t]` of them end-of-sequence ids, with the cap `T = len(allowed)`."""
    cap = len(allowed)
    survival = 1.0
    entropy_sum = 0.0
    length_distribution, entropy_sums = [], []
    for step in range(cap):
        entropy_sum += math.log(allowed[step])
        end_probability = 1.0 if step + 1 == cap else ends[step] / allowed[step]
        length_distribution.append(survival * end_probability)
        entropy_sums.append(entropy_sum)
        survival *= 1 - ends[step] / allowed[step]
    ce_star = sum(p * s for p, s in zip(length_distribution, entropy_sums))
    variance = sum(p * (s - ce_star) ** 2 for p, s in zip(length_distribution, entropy_sums))
    open_prefixes = [1]
    for step in range(cap - 1):
        open_prefixes.append(open_prefixes[-1] * (allowed[step] - ends[step]))
    num_leaves = sum(open_prefixes[step] * ends[step] for step in range(cap - 1)) + open_prefixes[-1] * allowed[-1]
    return {
        "ce_star": ce_star,
        "length_distribution": length_distribution,
        "mean_length": sum((n + 1) * p for n, p in enumerate(length_distribution)),
        "truncation_probability": survival,
        "entropy_rate": sum(p * s / (n + 1) for n, (p, s) in enumerate(zip(length_distribution, entropy_sums))),
        "variance": variance,
        "num_nodes": sum(open_prefixes),
        "num_leaves": num_leaves,
    }


@pytest.mark.parametrize(
    "case",
    [
        # (eos ids, generation config fields, policy, allowed tokens per step, end-of-sequence ids among them)
        ([0], {}, {}, [5, 5, 5, 5], [1, 1, 1, 1]),
        ([0, 1], {}, {"temperature": 0.4}, [5, 5, 5, 5, 5], [2, 2, 2, 2, 2]),
        ([0], {"suppress_tokens": [4]}, {}, [4, 4, 4], [1, 1, 1]),
        # min_new_tokens counts from the prompt end: the end token is banned at steps 1 and 2 only.
        ([0, 1], {"min_new_tokens": 2, "suppress_tokens": [4]}, {}, [2, 2, 4, 4], [0, 0, 2, 2]),
        # forced_eos_token_id acts at the real cap, so no rollout is truncated.
        ([0], {"forced_eos_token_id": 0}, {}, [5, 5, 5, 1], [1, 1, 1, 1]),
    ],
    ids=["plain", "two-eos-temperature", "suppress", "min-new-tokens", "forced-eos"],
)
def test_walker_matches_closed_form(case):
    eos, generation, policy, allowed, ends = case
    model = make_word_model(eos_token_id=eos, zero_weights=True, **generation)
    expected = closed_form_uniform(allowed, ends)

    tree = exact_canopy(model, make_word_tokenizer(), PROMPT, sampling_config(max_new_tokens=len(allowed), **policy))

    assert tree.ce_star == pytest.approx(expected["ce_star"], rel=1e-9)
    assert tree.length_distribution == pytest.approx(expected["length_distribution"], abs=1e-12)
    assert tree.mean_length == pytest.approx(expected["mean_length"], rel=1e-9)
    assert tree.truncation_probability == pytest.approx(expected["truncation_probability"], abs=1e-12)
    assert tree.entropy_rate == pytest.approx(expected["entropy_rate"], rel=1e-9)
    assert tree.entropy_sum_variance == pytest.approx(expected["variance"], rel=1e-9, abs=1e-12)
    # Under a uniform policy the surprisal of every token equals the step entropy.
    assert tree.surprisal_sum_variance == pytest.approx(expected["variance"], rel=1e-9, abs=1e-12)
    assert tree.probability_mass == pytest.approx(1.0, abs=1e-12)
    assert tree.num_nodes == expected["num_nodes"]
    assert tree.num_leaves == expected["num_leaves"]


def test_single_continuation_has_zero_canopy_entropy():
    model = make_word_model(seed=4, eos_token_id=0)
    tokenizer = make_word_tokenizer()
    config = sampling_config(top_k=1, max_new_tokens=5)

    tree = exact_canopy(model, tokenizer, PROMPT, config)
    result = sample_rollouts(model, tokenizer, [PROMPT], config)[0]
    estimates = estimate_prompt(result.stats)

    assert tree.ce_star == 0.0
    assert tree.entropy_sum_variance == 0.0
    assert tree.surprisal_sum_variance == 0.0
    assert tree.num_leaves == 1
    assert sorted(tree.length_distribution)[-1] == 1.0
    assert len({tuple(ids) for ids in result.token_ids}) == 1
    assert result.stats.num_rollouts == ROLLOUTS_PER_SEED
    assert estimates.ce_star == 0.0
    assert estimates.ce_star_mc == pytest.approx(0.0, abs=1e-6)
    assert int(result.stats.lengths[0]) == tree.length_distribution.index(1.0) + 1


def test_walker_rejects_too_large_tree():
    model = make_word_model()
    with pytest.raises(ValueError, match=r"more than max_nodes=20 nodes.*lower max_new_tokens"):
        exact_canopy(model, make_word_tokenizer(), PROMPT, sampling_config(max_new_tokens=5), max_nodes=20)


def test_walker_leaves_global_state():
    model = make_word_model()
    model.train()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    torch_state = torch.get_rng_state()
    python_state = random.getstate()
    numpy_state = np.random.get_state()

    exact_canopy(model, make_word_tokenizer(), PROMPT, sampling_config(max_new_tokens=3))

    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert model.training


# ---------------------------------------------------------------------------
# Both estimators against the exact tree


@dataclass
class PolicyCase:
    name: str
    policy: dict = field(default_factory=dict)
    eos_token_id: object = 0
    generation: dict = field(default_factory=dict)


POLICY_CASES = [
    PolicyCase("plain"),
    PolicyCase("cold", {"temperature": 0.5}),
    PolicyCase("hot", {"temperature": 2.0}),
    PolicyCase("top-k", {"top_k": 2, "max_new_tokens": 8}),
    PolicyCase("top-p", {"top_p": 0.7, "max_new_tokens": 6}),
    PolicyCase("mixed", {"temperature": 1.3, "top_k": 3, "top_p": 0.9}),
    PolicyCase("two-eos", eos_token_id=[0, 1]),
    # A cap of 2 tokens cuts most rollouts.
    PolicyCase("short-cap", {"max_new_tokens": 2}),
    # forced_eos_token_id makes the T-th token an end token: truncation probability is exactly 0.
    PolicyCase("forced-eos", {"max_new_tokens": 4}, generation={"forced_eos_token_id": 0}),
    # Processors of the model's generation config, which the walker must apply as generate does.
    PolicyCase(
        "penalties",
        {"temperature": 0.8},
        eos_token_id=[0, 1],
        generation={"repetition_penalty": 1.8, "min_new_tokens": 2, "suppress_tokens": [4]},
    ),
    PolicyCase(
        "bans",
        {"max_new_tokens": 6},
        generation={
            "no_repeat_ngram_size": 2,
            "bad_words_ids": [[2, 3]],
            "sequence_bias": {(0,): 1.5},
            "exponential_decay_length_penalty": (2, 1.5),
            "begin_suppress_tokens": [2],
        },
    ),
]


def z_scores(estimates: list[float], standard_errors: list[float], truth: float) -> np.ndarray:
    return (np.array(estimates) - truth) / np.array(standard_errors)


def assert_z_scores_fit(z: np.ndarray, label: str) -> None:
    limit = scipy_stats.chi2.ppf(CHI_SQUARE_QUANTILE, df=len(z))
    assert np.abs(z).max() < Z_LIMIT, f"{label}: z-scores {np.round(z, 2).tolist()}"
    assert float((z**2).sum()) < limit, f"{label}: sum of z^2 {float((z**2).sum()):.1f} above {limit:.1f}"


def chi_square_p_value(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Pearson's chi-square test of `counts` against `probabilities`, bins with fewer than 5
    expected counts merged into one."""
    expected = counts.sum() * probabilities
    large = expected >= 5
    observed_bins = list(counts[large])
    expected_bins = list(expected[large])
    if expected[~large].sum() > 0:
        observed_bins.append(counts[~large].sum())
        expected_bins.append(expected[~large].sum())
    _, p_value = scipy_stats.chisquare(observed_bins, expected_bins)
    return float(p_value)


@pytest.mark.parametrize("case", POLICY_CASES, ids=lambda case: case.name)
def test_estimators_agree_with_exact_tree(case):
    model = make_word_model(seed=1, eos_token_id=case.eos_token_id, **case.generation)
    tokenizer = make_word_tokenizer()
    tree = exact_canopy(model, tokenizer, PROMPT, sampling_config(**case.policy))

    estimates, lengths, truncated, entropy_sum_variances, surprisal_sum_variances = [], [], [], [], []
    for seed in SEEDS:
        result = sample_rollouts(model, tokenizer, [PROMPT], sampling_config(seed=seed, **case.policy))[0]
        estimates.append(estimate_prompt(result.stats))
        lengths.append(result.stats.lengths)
        truncated.append(result.stats.truncated)
        entropy_sum_variances.append(float(result.stats.entropy_sums.var()))
        surprisal_sum_variances.append(float(result.stats.surprisal_sums.var()))
    lengths = torch.cat(lengths).numpy()
    truncated = torch.cat(truncated).numpy()

    rao_blackwell_z = z_scores([e.ce_star for e in estimates], [e.ce_star_se for e in estimates], tree.ce_star)
    monte_carlo_z = z_scores([e.ce_star_mc for e in estimates], [e.ce_star_mc_se for e in estimates], tree.ce_star)
    assert_z_scores_fit(rao_blackwell_z, f"ce_star vs exact {tree.ce_star:.4f}")
    assert_z_scores_fit(monte_carlo_z, f"ce_star_mc vs exact {tree.ce_star:.4f}")

    # The standard errors come from the per-seed sample variances of S and L, so those
    # must scatter around the exact Var(S) and Var(L).
    for label, sample_variances, exact in [
        ("Var(S)", entropy_sum_variances, tree.entropy_sum_variance),
        ("Var(L)", surprisal_sum_variances, tree.surprisal_sum_variance),
    ]:
        spread = np.std(sample_variances, ddof=1) / math.sqrt(len(sample_variances))
        z = (np.mean(sample_variances) - exact) / spread
        assert abs(z) < Z_LIMIT, f"{label}: mean sample variance {np.mean(sample_variances):.4f}, exact {exact:.4f}"

    length_probabilities = np.array(tree.length_distribution)
    counts = np.bincount(lengths - 1, minlength=len(length_probabilities))
    assert counts[length_probabilities == 0].sum() == 0
    assert chi_square_p_value(counts, length_probabilities) > 1 - CHI_SQUARE_QUANTILE

    support = np.arange(1, len(length_probabilities) + 1)
    length_variance = float((length_probabilities * (support - tree.mean_length) ** 2).sum())
    mean_length_z = z_scores(
        [e.mean_length for e in estimates], [math.sqrt(length_variance / ROLLOUTS_PER_SEED)] * len(estimates), tree.mean_length
    )
    assert_z_scores_fit(mean_length_z, f"mean length vs exact {tree.mean_length:.4f}")

    p = tree.truncation_probability
    if p in (0.0, 1.0):
        assert truncated.mean() == p
    else:
        assert abs(truncated.mean() - p) / math.sqrt(p * (1 - p) / truncated.size) < Z_LIMIT


def test_cap_cases_truncate_as_described():
    tokenizer = make_word_tokenizer()
    short = exact_canopy(make_word_model(seed=1), tokenizer, PROMPT, sampling_config(max_new_tokens=2))
    forced = exact_canopy(
        make_word_model(seed=1, forced_eos_token_id=0), tokenizer, PROMPT, sampling_config(max_new_tokens=4)
    )

    assert short.truncation_probability > 0.5
    assert forced.truncation_probability == 0.0
    assert forced.length_distribution[-1] > 0.1


def test_generation_config_processors_change_exact_tree():
    # The processor cases above would pass trivially if the processors did nothing.
    tokenizer = make_word_tokenizer()
    config = sampling_config(temperature=0.8)
    plain = exact_canopy(make_word_model(seed=1, eos_token_id=[0, 1]), tokenizer, PROMPT, config)
    penalised = exact_canopy(
        make_word_model(seed=1, eos_token_id=[0, 1], repetition_penalty=1.8, min_new_tokens=2, suppress_tokens=[4]),
        tokenizer,
        PROMPT,
        config,
    )

    assert plain.length_distribution[0] > 0.01
    assert penalised.length_distribution[0] == 0.0
    assert penalised.length_distribution[1] == 0.0
    assert penalised.length_distribution[2] > 0.01
    assert abs(penalised.ce_star - plain.ce_star) > 0.1
