import dataclasses
import math

import pytest
import torch

from canopy_monitor.estimators import (
    BootstrapConfig,
    RolloutStats,
    estimate_prompt,
    paired_change,
    pool_prompts,
    resample_indices,
)
from canopy_monitor.estimators.pooled import BOOTSTRAP_REASON, THIN_SUPPORT_REASON


def random_prompt(generator, shift: float = 0.0, num_rollouts: int = 8):
    lengths = torch.randint(3, 40, (num_rollouts,), generator=generator)
    rates = torch.rand(num_rollouts, generator=generator, dtype=torch.float64) + shift
    sums = rates * lengths
    surprisals = sums + torch.randn(num_rollouts, generator=generator, dtype=torch.float64)
    truncated = lengths >= 35
    return RolloutStats(lengths, sums, surprisals, truncated)


def prompt_estimates(seed: int, count: int, shift_by_prompt=None):
    generator = torch.Generator().manual_seed(seed)
    shifts = shift_by_prompt or [0.0] * count
    return [estimate_prompt(random_prompt(generator, shifts[i])) for i in range(count)]


def test_interval_of_mean_matches_hand_resampling():
    estimates = prompt_estimates(0, 6)
    config = BootstrapConfig(samples=400, confidence=0.9, seed=5)

    pooled = pool_prompts(estimates, config)

    values = torch.tensor([e.ce_star for e in estimates], dtype=torch.float64)
    replicates = values[resample_indices(6, config)].mean(dim=1)
    expected = torch.quantile(replicates, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
    assert pooled.intervals["ce_star"] == pytest.approx(tuple(expected), rel=1e-12)
    assert pooled.confidence == 0.9
    assert pooled.bootstrap_samples == 400


def test_every_pooled_figure_has_an_interval():
    estimates = prompt_estimates(1, 5)

    pooled = pool_prompts(estimates, BootstrapConfig(samples=200))

    expected = set(pooled.figures()) - {"ce_star_se", "ce_star_mc_se", "completed/ce_star_se", "completed/ce_star_mc_se"}
    assert set(pooled.intervals) == expected
    assert "rho_length_rate" in pooled.intervals
    assert "completed/ce_star" in pooled.intervals
    assert pooled.completed.intervals["ce_star"] == pooled.intervals["completed/ce_star"]
    for name, (low, high) in pooled.intervals.items():
        assert low <= high, name


def test_identical_prompts_give_zero_width_intervals():
    generator = torch.Generator().manual_seed(2)
    one = estimate_prompt(random_prompt(generator))

    pooled = pool_prompts([one, one, one], BootstrapConfig(samples=100))

    low, high = pooled.intervals["ce_star"]
    assert low == pytest.approx(pooled.ce_star, rel=1e-12)
    assert high == pytest.approx(pooled.ce_star, rel=1e-12)


def test_one_prompt_has_no_interval_and_a_reason():
    pooled = pool_prompts(prompt_estimates(3, 1), BootstrapConfig(samples=100))

    assert pooled.intervals == {}
    assert pooled.confidence is None
    assert pooled.undefined[BOOTSTRAP_REASON] == 1


def test_no_bootstrap_means_no_intervals():
    pooled = pool_prompts(prompt_estimates(3, 4))

    assert pooled.intervals == {}
    assert pooled.bootstrap_samples == 0


def test_intervals_cover_true_mean_at_nominal_rate():
    # Per-prompt CE* drawn from a normal distribution with mean 10: a 90% interval over
    # 30 prompts should cover 10 in about 90% of 100 data sets (percentile intervals
    # run slightly narrow, so the accepted range is 78..97).
    generator = torch.Generator().manual_seed(11)
    config = BootstrapConfig(samples=400, confidence=0.9)
    sums = torch.tensor([9.0, 11.0, 10.0, 10.0], dtype=torch.float64)
    template = estimate_prompt(RolloutStats(torch.tensor([4, 5, 6, 7]), sums, sums, torch.zeros(4, dtype=torch.bool)))
    covered = 0
    for _ in range(100):
        values = (10.0 + 2.0 * torch.randn(30, generator=generator, dtype=torch.float64)).tolist()
        estimates = [dataclasses.replace(template, ce_star=value) for value in values]
        low, high = pool_prompts(estimates, config).intervals["ce_star"]
        covered += low <= 10.0 <= high
    assert 78 <= covered <= 97


def test_bootstrap_config_rejects_bad_values():
    with pytest.raises(ValueError, match="samples"):
        BootstrapConfig(samples=-1)
    with pytest.raises(ValueError, match="confidence"):
        BootstrapConfig(confidence=1.0)
    with pytest.raises(ValueError, match="seed"):
        BootstrapConfig(seed=-3)


def test_change_against_itself_is_zero():
    estimates = prompt_estimates(4, 6)

    changes = paired_change(estimates, estimates, BootstrapConfig(samples=300))

    for name, change in changes.items():
        if math.isnan(change.before):
            continue
        assert change.delta == 0.0, name
        assert change.ci_low == 0.0, name
        assert change.ci_high == 0.0, name


def test_change_pairs_the_resampled_prompts():
    # Prompts differ a lot in entropy rate, and every prompt's rate rises by exactly 0.5.
    # With the same resampled prompts on both sides every replicate of the change of the
    # mean entropy rate is 0.5; unpaired resampling would give a wide interval.
    shifts = [0.0, 3.0, 6.0, 9.0, 12.0]
    before = [estimate_prompt(random_prompt(torch.Generator().manual_seed(7 + i), shifts[i])) for i in range(5)]
    after = [estimate_prompt(random_prompt(torch.Generator().manual_seed(7 + i), shifts[i] + 0.5)) for i in range(5)]

    change = paired_change(before, after, BootstrapConfig(samples=300))["entropy_rate"]

    assert change.delta == pytest.approx(0.5, abs=1e-12)
    assert change.ci_low == pytest.approx(0.5, abs=1e-12)
    assert change.ci_high == pytest.approx(0.5, abs=1e-12)
    assert change.relative_change == pytest.approx(0.5 / change.before)


def test_change_interval_matches_hand_resampling():
    before = prompt_estimates(5, 6)
    after = prompt_estimates(6, 6)
    config = BootstrapConfig(samples=250, confidence=0.8, seed=9)

    change = paired_change(before, after, config)["ce_star"]

    indices = resample_indices(6, config)
    values_before = torch.tensor([e.ce_star for e in before], dtype=torch.float64)
    values_after = torch.tensor([e.ce_star for e in after], dtype=torch.float64)
    deltas = values_after[indices].mean(dim=1) - values_before[indices].mean(dim=1)
    expected = torch.quantile(deltas, torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
    assert (change.ci_low, change.ci_high) == pytest.approx(tuple(expected), rel=1e-12)


def test_change_needs_same_prompt_count():
    with pytest.raises(ValueError, match="same prompts"):
        paired_change(prompt_estimates(0, 3), prompt_estimates(0, 4))


def test_figure_defined_by_one_prompt_has_nan_interval():
    # Only the first prompt has 4 rollouts, so only it defines the pooled Pearson
    # correlation; resampling one prompt would give an interval of zero width.
    generator = torch.Generator().manual_seed(8)
    estimates = [
        estimate_prompt(random_prompt(generator, num_rollouts=6)),
        estimate_prompt(random_prompt(generator, num_rollouts=3)),
        estimate_prompt(random_prompt(generator, num_rollouts=3)),
    ]

    pooled = pool_prompts(estimates, BootstrapConfig(samples=200))

    assert math.isfinite(pooled.rho_length_rate)
    assert all(math.isnan(bound) for bound in pooled.intervals["rho_length_rate"])
    low, high = pooled.intervals["rho_length_rate_kendall"]
    assert low < high
    assert THIN_SUPPORT_REASON in pooled.undefined


def test_change_with_one_defining_prompt_nan():
    generator = torch.Generator().manual_seed(9)
    before = [estimate_prompt(random_prompt(generator, num_rollouts=6))] + [
        estimate_prompt(random_prompt(generator, num_rollouts=3)) for _ in range(2)
    ]
    after = [estimate_prompt(random_prompt(generator, num_rollouts=6))] + [
        estimate_prompt(random_prompt(generator, num_rollouts=3)) for _ in range(2)
    ]

    changes = paired_change(before, after, BootstrapConfig(samples=200))

    assert math.isfinite(changes["rho_length_rate"].delta)
    assert math.isnan(changes["rho_length_rate"].ci_low)
    assert changes["ce_star"].ci_low < changes["ce_star"].ci_high
