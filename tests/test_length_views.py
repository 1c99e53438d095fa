import math

import pytest
import torch

from canopy_monitor.estimators import (
    RolloutStats,
    default_running_positions,
    estimate_prompt,
    length_buckets,
    pool_prompts,
    running_entropy_rates,
)
from canopy_monitor.estimators.prompt import COMPLETED_REASON


def make_stats(lengths, entropy_sums, truncated=None):
    lengths = torch.tensor(lengths)
    sums = torch.tensor(entropy_sums, dtype=torch.float64)
    flags = torch.zeros(len(lengths), dtype=torch.bool) if truncated is None else torch.tensor(truncated)
    return RolloutStats(lengths, sums, sums.clone(), flags)


def test_buckets_split_eight_rollouts_3_2_3():
    # Rates r = S / N: N=5 -> 1.0, N=1 -> 2.0, N=3 -> 1.0, N=8 -> 0.5, N=2 -> 1.5, N=7 -> 1.0, N=4 -> 0.5, N=6 -> 2.0
    stats = make_stats([5, 1, 3, 8, 2, 7, 4, 6], [5.0, 2.0, 3.0, 4.0, 3.0, 7.0, 2.0, 12.0])

    buckets = length_buckets(stats)

    assert [buckets[name].num_rollouts for name in ("short", "medium", "long")] == [3, 2, 3]
    # Short: N = 1, 2, 3; medium: N = 4, 5; long: N = 6, 7, 8.
    assert buckets["short"].mean_length == pytest.approx(2.0)
    assert buckets["short"].entropy_rate == pytest.approx((2.0 + 1.5 + 1.0) / 3)
    assert buckets["medium"].mean_length == pytest.approx(4.5)
    assert buckets["medium"].entropy_rate == pytest.approx((0.5 + 1.0) / 2)
    assert buckets["long"].mean_length == pytest.approx(7.0)
    assert buckets["long"].entropy_rate == pytest.approx((2.0 + 1.0 + 0.5) / 3)


def test_buckets_keep_sampling_order_on_ties():
    # Four rollouts of equal length: ranks follow their order, giving sizes 1, 2, 1.
    stats = make_stats([4, 4, 4, 4], [4.0, 8.0, 12.0, 16.0])

    buckets = length_buckets(stats)

    assert buckets["short"].entropy_rate == pytest.approx(1.0)
    assert buckets["medium"].entropy_rate == pytest.approx(2.5)
    assert buckets["long"].entropy_rate == pytest.approx(4.0)


def test_two_rollouts_leave_medium_bucket_empty():
    estimates = estimate_prompt(make_stats([2, 6], [2.0, 3.0]))

    assert math.isnan(estimates.entropy_rate_medium)
    assert math.isnan(estimates.mean_length_medium)
    assert estimates.entropy_rate_short == pytest.approx(1.0)
    assert estimates.entropy_rate_long == pytest.approx(0.5)
    assert "a length bucket is empty because there are fewer than 3 rollouts" in estimates.undefined


def test_running_rates_by_hand():
    # Three rollouts of lengths 2, 4 and 3; entries at or after a rollout's end are ignored.
    step_entropies = torch.tensor(
        [
            [1.0, 3.0, 9.0, 9.0],
            [2.0, 2.0, 2.0, 6.0],
            [0.5, 0.5, 2.0, 9.0],
        ]
    )
    lengths = torch.tensor([2, 4, 3])

    rates = running_entropy_rates(step_entropies, lengths, [1, 2, 3, 4])

    assert rates[1].entropy_rate == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert rates[1].active_share == pytest.approx(1.0)
    assert rates[2].entropy_rate == pytest.approx((4.0 / 2 + 4.0 / 2 + 1.0 / 2) / 3)
    # Only the rollouts of lengths 4 and 3 reach position 3.
    assert rates[3].entropy_rate == pytest.approx((6.0 / 3 + 3.0 / 3) / 2)
    assert rates[3].active_share == pytest.approx(2 / 3)
    assert rates[4].entropy_rate == pytest.approx(12.0 / 4)
    assert rates[4].active_share == pytest.approx(1 / 3)


def test_running_rate_past_every_rollout_is_nan():
    rates = running_entropy_rates(torch.ones(2, 3), torch.tensor([2, 3]), [16])

    assert math.isnan(rates[16].entropy_rate)
    assert rates[16].active_share == 0.0


def test_running_rate_at_full_length_is_entropy_rate():
    generator = torch.Generator().manual_seed(0)
    step_entropies = torch.rand(5, 8, generator=generator, dtype=torch.float64)
    lengths = torch.full((5,), 8)
    stats = RolloutStats(lengths, step_entropies.sum(dim=1), step_entropies.sum(dim=1), torch.zeros(5, dtype=torch.bool))

    estimates = estimate_prompt(stats, step_entropies, running_positions=[8])

    assert estimates.running_entropy_rate[8] == pytest.approx(estimates.entropy_rate, rel=1e-12)


def test_default_running_positions():
    assert default_running_positions(8) == ()
    assert default_running_positions(16) == (16,)
    assert default_running_positions(96) == (16, 32, 64)
    assert default_running_positions(128) == (16, 32, 64, 128)


def test_completed_only_uses_rollouts_that_ended():
    stats = make_stats([2, 4, 6, 8, 8], [1.0, 4.0, 3.0, 8.0, 4.0], [False, False, False, True, True])

    estimates = estimate_prompt(stats)
    expected = estimate_prompt(make_stats([2, 4, 6], [1.0, 4.0, 3.0]), completed_only=False)

    assert estimates.completed == expected
    assert estimates.completed.ce_star == pytest.approx(8.0 / 3)
    assert estimates.completed.truncation_rate == 0.0
    assert estimates.completed.completed is None


def test_completed_only_needs_two_rollouts():
    estimates = estimate_prompt(make_stats([2, 8, 8], [1.0, 4.0, 4.0], [False, True, True]))

    assert estimates.completed is None
    assert COMPLETED_REASON in estimates.undefined


def test_pooled_length_views_are_means_over_prompts():
    first_entropies = torch.tensor([[1.0] * 16 + [0.0] * 4, [2.0] * 20, [3.0] * 20])
    first = estimate_prompt(
        make_stats([16, 20, 20], [16.0, 40.0, 60.0], [False, True, True]),
        first_entropies,
        running_positions=[16],
    )
    second_entropies = torch.tensor([[1.0] * 20, [1.0] * 20, [4.0] * 20])
    second = estimate_prompt(
        make_stats([18, 19, 20], [18.0, 19.0, 80.0]),
        second_entropies,
        running_positions=[16],
    )

    pooled = pool_prompts([first, second])

    assert pooled.entropy_rate_long == pytest.approx((3.0 + 4.0) / 2)
    assert pooled.mean_length_short == pytest.approx((16 + 18) / 2)
    assert pooled.running_entropy_rate[16] == pytest.approx((2.0 + 2.0) / 2)
    assert pooled.running_active_share[16] == pytest.approx(1.0)
    # The first prompt has one completed rollout, so only the second is pooled there.
    assert pooled.completed.num_prompts == 1
    assert pooled.completed.ce_star == pytest.approx(second.ce_star)
    assert pooled.undefined[COMPLETED_REASON] == 1
    assert pooled.figures()["completed/ce_star"] == pooled.completed.ce_star
    assert "completed/truncation_rate" not in pooled.figures()


def test_unreached_position_has_reason():
    estimates = estimate_prompt(make_stats([2, 3, 3], [2.0, 3.0, 3.0]), torch.ones(3, 3), running_positions=[16])

    pooled = pool_prompts([estimates, estimates])

    assert math.isnan(pooled.running_entropy_rate[16])
    assert any("reached token 16" in reason for reason in pooled.undefined)


def test_estimates_round_trip_through_dict():
    stats = make_stats([2, 4, 6, 8], [1.0, 4.0, 3.0, 8.0], [False, False, True, False])
    estimates = estimate_prompt(stats, torch.ones(4, 8), running_positions=[2, 4])

    rebuilt = type(estimates).from_dict(estimates.to_dict())

    assert rebuilt.to_dict() == estimates.to_dict()
    assert rebuilt.running_entropy_rate == {2: 1.0, 4: 1.0}
