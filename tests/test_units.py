import math

import pytest

from canopy_monitor.sinks.units import check_units, convert_flat, convert_nested, is_entropy_valued, unit_factor

LN2 = math.log(2.0)


@pytest.mark.parametrize(
    "name",
    [
        "ce_star",
        "canopy/ce_star_ci_low",
        "canopy/completed/entropy_rate_long_ci_high",
        "canopy/change/conveyance",
        "canopy/running_entropy_rate_64",
        "entropy_sum",
    ],
)
def test_entropy_valued_names(name):
    assert is_entropy_valued(name)


@pytest.mark.parametrize(
    "name",
    [
        "canopy/rho_length_rate",
        "canopy/branching_factor",
        "canopy/generation_perplexity",
        "canopy/mean_length_short",
        "canopy/running_active_share_64",
        "canopy/mc_variance_ratio",
        "canopy/truncation_rate",
    ],
)
def test_unitless_names(name):
    assert not is_entropy_valued(name)


def test_flat_conversion_to_bits():
    values = {"canopy/ce_star": 2.0, "canopy/branching_factor": 3.0, "canopy/ce_star_ci_low": LN2}

    converted = convert_flat(values, "bits")

    assert converted["canopy/ce_star"] == pytest.approx(2.0 / LN2)
    assert converted["canopy/branching_factor"] == 3.0
    assert converted["canopy/ce_star_ci_low"] == pytest.approx(1.0)


def test_nested_conversion_round_trip():
    document = {
        "ce_star": LN2,
        "rho_pearson": 0.5,
        "running_entropy_rate": {"16": 2 * LN2},
        "running_active_share": {"16": 0.75},
        "intervals": {"ce_star": [LN2, 2 * LN2], "rho_length_rate": [0.1, 0.2]},
        "completed": {"conveyance": LN2, "num_rollouts": 4},
        "rollouts": [{"entropy_sum": 3 * LN2, "length": 5, "truncated": False}],
    }

    bits = convert_nested(document, "bits")

    assert bits["ce_star"] == pytest.approx(1.0)
    assert bits["rho_pearson"] == 0.5
    assert bits["running_entropy_rate"]["16"] == pytest.approx(2.0)
    assert bits["running_active_share"]["16"] == 0.75
    assert bits["intervals"]["ce_star"] == pytest.approx([1.0, 2.0])
    assert bits["intervals"]["rho_length_rate"] == [0.1, 0.2]
    assert bits["completed"]["conveyance"] == pytest.approx(1.0)
    assert bits["completed"]["num_rollouts"] == 4
    assert bits["rollouts"][0] == {"entropy_sum": pytest.approx(3.0), "length": 5, "truncated": False}
    assert convert_nested(bits, "nats", from_units="bits")["ce_star"] == pytest.approx(LN2)


def test_unit_factor_and_check():
    assert unit_factor("nats") == 1.0
    assert unit_factor("bits") == pytest.approx(1 / LN2)
    assert unit_factor("nats", from_units="bits") == pytest.approx(LN2)
    with pytest.raises(ValueError, match="units must be 'nats' or 'bits'"):
        check_units("shannons")
