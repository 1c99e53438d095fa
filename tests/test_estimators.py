import math

import pytest
import torch

from canopy_monitor.estimators import (
    RolloutStats,
    average_ranks,
    correlate,
    estimate_prompt,
    fisher_pool,
    pool_prompts,
    summarize_rollouts,
)


def stats(lengths, entropy_sums, surprisal_sums=None, truncated=None):
    lengths = torch.tensor(lengths)
    entropy_sums = torch.tensor(entropy_sums, dtype=torch.float64)
    surprisal_sums = entropy_sums.clone() if surprisal_sums is None else torch.tensor(surprisal_sums, dtype=torch.float64)
    truncated = torch.zeros(len(lengths), dtype=torch.bool) if truncated is None else torch.tensor(truncated)
    return RolloutStats(lengths, entropy_sums, surprisal_sums, truncated)


def test_prompt_estimates_hand_computed():
    # N = [2, 4, 6, 8], S = [1, 4, 3, 8]  ->  r = [0.5, 1.0, 0.5, 1.0]
    estimates = estimate_prompt(stats([2, 4, 6, 8], [1.0, 4.0, 3.0, 8.0], [2.0, 3.0, 5.0, 6.0], [False, False, False, True]))

    assert estimates.ce_star == pytest.approx(4.0)
    # std(S) with divisor 3: var = ((−3)² + 0 + (−1)² + 4²) / 3 = 26 / 3
    assert estimates.ce_star_se == pytest.approx(math.sqrt(26 / 3) / 2)
    assert estimates.ce_star_mc == pytest.approx(4.0)
    # var(L) = (4 + 1 + 1 + 4) / 3 = 10 / 3
    assert estimates.ce_star_mc_se == pytest.approx(math.sqrt(10 / 3) / 2)
    assert estimates.mc_variance_ratio == pytest.approx(10 / 26)
    assert estimates.mean_length == pytest.approx(5.0)
    assert estimates.entropy_rate == pytest.approx(0.75)
    assert estimates.branching_factor == pytest.approx(math.exp(0.75))
    assert estimates.generation_perplexity == pytest.approx(math.exp(4.0 / 5.0))
    assert estimates.truncation_rate == pytest.approx(0.25)
    # Cov_M(N, r) = mean((N - 5)(r - 0.75)) = (-3*-0.25 + -1*0.25 + 1*-0.25 + 3*0.25) / 4 = 0.25
    assert estimates.conveyance == pytest.approx(0.25)
    assert estimates.length_driven == pytest.approx(3.75)
    assert estimates.length_rate_covariance == pytest.approx(1.0 / 3.0)
    # Pearson: cov = 1/3, var(N) = 20/3, var(r) = 1/12  ->  (1/3) / sqrt(20/36) = 2/sqrt(20)
    assert estimates.rho_pearson == pytest.approx(2 / math.sqrt(20))
    assert estimates.undefined == ()


def test_decomposition_identity_random():
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        lengths = torch.randint(1, 50, (16,), generator=generator)
        sums = torch.rand(16, generator=generator, dtype=torch.float64) * lengths * 3
        estimates = estimate_prompt(RolloutStats(lengths, sums, sums * 1.1, torch.zeros(16, dtype=torch.bool)))
        assert estimates.length_driven + estimates.conveyance == pytest.approx(estimates.ce_star, rel=1e-12)


def test_correlation_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], dtype=torch.float64)
    y = torch.tensor([2.7, 1.8, 2.8, 1.8, 2.8, 4.5, 9.0, 4.5, 2.3, 5.3], dtype=torch.float64)

    result = correlate(x, y)

    assert result.pearson == pytest.approx(scipy_stats.pearsonr(x, y)[0], abs=1e-12)
    assert result.spearman == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-12)
    assert result.kendall == pytest.approx(scipy_stats.kendalltau(x, y)[0], abs=1e-12)
    assert result.covariance == pytest.approx(float(torch.cov(torch.stack([x, y]))[0, 1]), abs=1e-12)


def test_average_ranks_ties():
    ranks = average_ranks(torch.tensor([10.0, 20.0, 10.0, 30.0]))
    assert ranks.tolist() == [1.5, 3.0, 1.5, 4.0]


def test_correlation_undefined_cases():
    constant = correlate(torch.tensor([4.0, 4.0, 4.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]), x_name="length")
    assert math.isnan(constant.pearson)
    assert math.isnan(constant.spearman)
    assert math.isnan(constant.kendall)
    assert constant.reason == "length is the same for every rollout"

    too_few = correlate(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]))
    assert math.isnan(too_few.pearson)
    assert too_few.reason == "fewer than 3 rollouts (2)"
    assert too_few.covariance == pytest.approx(-0.5)


def test_deterministic_policy_gives_zero_and_reasons():
    estimates = estimate_prompt(stats([5, 5, 5], [0.0, 0.0, 0.0]))
    assert estimates.ce_star == 0.0
    assert estimates.ce_star_se == 0.0
    assert math.isnan(estimates.rho_pearson)
    assert math.isnan(estimates.mc_variance_ratio)
    assert len(estimates.undefined) == 2


def test_pooling_hand_computed():
    first = estimate_prompt(stats([1, 2, 3, 4, 5], [1.0, 2.0, 6.0, 8.0, 20.0]))
    second = estimate_prompt(stats([2, 2, 4, 4, 6, 6], [2.0, 3.0, 4.0, 8.0, 6.0, 12.0]))

    pooled = pool_prompts([first, second])

    assert pooled.num_prompts == 2
    assert pooled.total_rollouts == 11
    assert pooled.ce_star == pytest.approx((first.ce_star + second.ce_star) / 2)
    assert pooled.mean_length == pytest.approx((first.mean_length + second.mean_length) / 2)
    assert pooled.entropy_rate == pytest.approx((first.entropy_rate + second.entropy_rate) / 2)
    assert pooled.branching_factor == pytest.approx(math.exp(pooled.entropy_rate))
    assert pooled.generation_perplexity == pytest.approx(math.exp(pooled.ce_star / pooled.mean_length))
    assert pooled.ce_star_se == pytest.approx(math.hypot(first.ce_star_se, second.ce_star_se) / 2)
    # Fisher z with weights n - 3 = 2 and 3.
    z = (2 * math.atanh(first.rho_pearson) + 3 * math.atanh(second.rho_pearson)) / 5
    assert pooled.rho_length_rate == pytest.approx(math.tanh(z))
    # Kendall weights n(n-1)/2 = 10 and 15; covariance weights n - 1 = 4 and 5.
    assert pooled.rho_length_rate_kendall == pytest.approx((10 * first.rho_kendall + 15 * second.rho_kendall) / 25)
    assert pooled.length_rate_covariance == pytest.approx(
        (4 * first.length_rate_covariance + 5 * second.length_rate_covariance) / 9
    )
    assert pooled.length_driven + pooled.conveyance == pytest.approx(pooled.ce_star, rel=1e-12)


def test_fisher_pool_skips_undefined_and_small():
    assert fisher_pool([float("nan"), 0.5], [10, 10]) == pytest.approx(0.5)
    assert math.isnan(fisher_pool([0.5, 0.2], [3, 2]))
    assert fisher_pool([1.0, 1.0], [5, 5]) == pytest.approx(1.0)


def test_pooling_counts_undefined_reasons():
    constant = estimate_prompt(stats([3, 3, 3, 3], [1.0, 2.0, 3.0, 4.0]))
    varied = estimate_prompt(stats([1, 2, 3, 4, 5], [1.0, 1.0, 4.0, 3.0, 9.0]))
    pooled = pool_prompts([constant, constant, varied])
    assert pooled.undefined == {"length-rate correlation undefined: length is the same for every rollout": 2}
    assert pooled.rho_length_rate == pytest.approx(varied.rho_pearson)


def test_pooling_reports_too_few_rollouts():
    three = estimate_prompt(stats([1, 2, 3], [1.0, 3.0, 2.0]))
    pooled = pool_prompts([three, three])
    assert math.isnan(pooled.rho_length_rate)
    assert math.isnan(pooled.rho_length_rate_spearman)
    assert pooled.undefined["the pooled Pearson and Spearman correlations need at least 4 rollouts per prompt (Fisher weights M - 3)"] == 2


def test_summarize_rollouts_masks_after_end():
    step_entropies = torch.tensor([[1.0, 2.0, 3.0], [0.5, float("nan"), float("inf")]])
    token_logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.25, float("-inf"), 0.0]])
    result = summarize_rollouts(step_entropies, token_logprobs, torch.tensor([3, 1]), torch.tensor([True, False]))
    assert result.entropy_sums.tolist() == [6.0, 0.5]
    assert result.surprisal_sums.tolist() == [6.0, 0.25]
    assert result.entropy_rates.tolist() == [2.0, 0.5]
    assert result.truncated.tolist() == [True, False]


def test_rollout_stats_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same 1-D shape"):
        RolloutStats(torch.tensor([1, 2]), torch.zeros(3), torch.zeros(2), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 1 token"):
        RolloutStats(torch.tensor([0, 2]), torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.bool))
