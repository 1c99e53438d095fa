"""Adversarial checks of the length views, bootstrap intervals, units and the exact tree walker.

Each test states the behaviour a user or a statistician can rely on. Edge cases must
give NaN with a reason and never raise, identities must hold to rounding, bits must be
nats / ln 2 for entropy-valued figures only, and bad options must fail early with one
line that names the option.
"""

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from canopy_monitor import CanopyMonitorCallback
from canopy_monitor.cli.evaluate import summary_line
from canopy_monitor.cli.main import main
from canopy_monitor.config import SamplingConfig
from canopy_monitor.estimators import (
    BootstrapConfig,
    PromptEstimates,
    RolloutStats,
    estimate_prompt,
    paired_change,
    pool_prompts,
    summarize_rollouts,
)
from canopy_monitor.estimators.pooled import (
    BOOTSTRAP_REASON,
    COMPLETED_REASON_PREFIX,
    NO_COMPLETED_REASON,
    POOLED_CORRELATION_REASON,
)
from canopy_monitor.estimators.prompt import COMPLETED_REASON
from canopy_monitor.exact import exact_canopy
from canopy_monitor.measurement import truncation_warning
from canopy_monitor.prompts import Prompt, encode_prompts
from canopy_monitor.sinks import json_safe, scalar_metrics
from canopy_monitor.sinks.units import convert_nested

from conftest import make_model, make_tokenizer, toy_conversations

LN2 = math.log(2.0)
HELDOUT = ["what is the sum of two plus two ?", "tell me a story", "how do i write a python function", "hello world"]

# Figures in nats (or nats per token), by base name. Every other figure has no entropy unit.
ENTROPY_FIGURES = {
    "ce_star",
    "ce_star_se",
    "ce_star_mc",
    "ce_star_mc_se",
    "entropy_rate",
    "entropy_rate_short",
    "entropy_rate_medium",
    "entropy_rate_long",
    "length_rate_covariance",
    "length_driven",
    "conveyance",
    "entropy_sum",
    "surprisal_sum",
}
UNITLESS_FIGURES = {
    "mc_variance_ratio",
    "mean_length",
    "mean_length_short",
    "mean_length_medium",
    "mean_length_long",
    "branching_factor",
    "generation_perplexity",
    "truncation_rate",
    "rho_length_rate",
    "rho_length_rate_spearman",
    "rho_length_rate_kendall",
    "rho_pearson",
    "rho_spearman",
    "rho_kendall",
    "monitor_seconds",
    "monitor_time_share",
    "monitor_errors",
}


def base_figure_name(name: str) -> str:
    """Strip `canopy/`, `completed/`, `change/` and the interval suffixes from a metric name."""
    for prefix in ("canopy/", "change/", "completed/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    for suffix in ("_ci_low", "_ci_high"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def has_entropy_unit(name: str) -> bool:
    base = base_figure_name(name)
    if base in ENTROPY_FIGURES or base.startswith("running_entropy_rate_"):
        return True
    assert base in UNITLESS_FIGURES or base.startswith("running_active_share_"), f"unclassified figure {name}"
    return False


def make_prompt(generator, num_rollouts=8, cap=12, truncated_count=None, running_positions=(1, 4, 12, 30)):
    """Build one prompt's estimates from random step entropies `[M, cap]`.

    The first `truncated_count` rollouts are cut at the cap, and the others end before it.
    """
    lengths = torch.randint(1, cap, (num_rollouts,), generator=generator)  # [M]
    truncated = torch.zeros(num_rollouts, dtype=torch.bool)
    if truncated_count is not None:
        truncated[:truncated_count] = True
        lengths[truncated] = cap
    step_entropies = torch.rand(num_rollouts, cap, generator=generator, dtype=torch.float64) * 2  # [M, cap]
    token_logprobs = -step_entropies * torch.rand(num_rollouts, cap, generator=generator, dtype=torch.float64) * 2
    stats = summarize_rollouts(step_entropies, token_logprobs, lengths, truncated)
    return estimate_prompt(stats, step_entropies, running_positions=running_positions)


def mixed_prompts(seed=0, count=5):
    """Prompts with some truncation, one of them with every rollout truncated."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [make_prompt(generator, truncated_count=3) for _ in range(count - 1)]
    prompts.append(make_prompt(generator, truncated_count=8))
    return prompts


def stats_from(lengths, entropy_sums, truncated=None, surprisal_sums=None):
    lengths = torch.tensor(lengths)
    sums = torch.tensor(entropy_sums, dtype=torch.float64)
    surprisals = sums * 1.5 if surprisal_sums is None else torch.tensor(surprisal_sums, dtype=torch.float64)
    flags = torch.zeros(len(lengths), dtype=torch.bool) if truncated is None else torch.tensor(truncated)
    return RolloutStats(lengths, sums, surprisals, flags)


# ---------------------------------------------------------------------------
# Edge cases: NaN with a reason, never an exception


def test_two_rollouts_nan_with_reasons():
    estimates = [estimate_prompt(stats_from([2, 5], [1.0, 4.0])), estimate_prompt(stats_from([3, 4], [2.0, 1.0]))]

    pooled = pool_prompts(estimates, BootstrapConfig(samples=50))

    assert math.isnan(estimates[0].rho_pearson)
    assert math.isnan(estimates[0].entropy_rate_medium)
    assert "length-rate correlation undefined: fewer than 3 rollouts (2)" in estimates[0].undefined
    assert math.isnan(pooled.rho_length_rate)
    assert math.isnan(pooled.rho_length_rate_kendall)
    assert math.isnan(pooled.entropy_rate_medium)
    assert pooled.undefined[POOLED_CORRELATION_REASON] == 2
    assert all(math.isnan(bound) for bound in pooled.intervals["rho_length_rate"])
    assert pooled.ce_star == pytest.approx(2.0)


def test_three_rollouts_pool_kendall_but_not_fisher():
    generator = torch.Generator().manual_seed(1)
    estimates = [make_prompt(generator, num_rollouts=3) for _ in range(4)]

    pooled = pool_prompts(estimates, BootstrapConfig(samples=50))

    assert all(math.isfinite(e.rho_pearson) for e in estimates)
    assert math.isnan(pooled.rho_length_rate)
    assert math.isnan(pooled.rho_length_rate_spearman)
    expected_kendall = sum(e.rho_kendall * 3 for e in estimates) / 12
    assert pooled.rho_length_rate_kendall == pytest.approx(expected_kendall)
    assert pooled.undefined[POOLED_CORRELATION_REASON] == 4


def test_every_rollout_truncated_keeps_nan_completed():
    # The completed-only figures keep their names, as NaN, so that logged keys do
    # not change from one monitoring point to the next.
    generator = torch.Generator().manual_seed(2)
    estimates = [make_prompt(generator, truncated_count=8) for _ in range(3)]
    defined = pool_prompts([make_prompt(generator, truncated_count=0) for _ in range(3)])

    pooled = pool_prompts(estimates, BootstrapConfig(samples=50))

    assert all(e.completed is None for e in estimates)
    assert pooled.completed.num_prompts == 0
    assert pooled.truncation_rate == 1.0
    assert pooled.undefined[COMPLETED_REASON] == 3
    assert pooled.completed.undefined[NO_COMPLETED_REASON] == 3
    # Each prompt's own reason already reports it, so the pooled one is not repeated.
    assert COMPLETED_REASON_PREFIX + NO_COMPLETED_REASON not in pooled.undefined
    completed_names = {name for name in pooled.figures() if name.startswith("completed/")}
    assert completed_names == {name for name in defined.figures() if name.startswith("completed/")}
    assert all(math.isnan(pooled.figures()[name]) for name in completed_names)


def test_no_rollout_truncated_completed_equals_all():
    generator = torch.Generator().manual_seed(3)
    estimates = [make_prompt(generator, truncated_count=0) for _ in range(3)]

    pooled = pool_prompts(estimates, BootstrapConfig(samples=50))

    figures = pooled.figures()
    for name, value in figures.items():
        completed_name = f"completed/{name}"
        if name == "truncation_rate" or completed_name not in figures:
            continue
        if math.isnan(value):
            assert math.isnan(figures[completed_name]), name
        else:
            assert figures[completed_name] == pytest.approx(value, rel=1e-12), name
    assert pooled.intervals["completed/ce_star"] == pytest.approx(pooled.intervals["ce_star"])


def test_identical_rollouts_zero_width_everything():
    stats = stats_from([4, 4, 4, 4], [2.0, 2.0, 2.0, 2.0], surprisal_sums=[2.0, 2.0, 2.0, 2.0])
    step_entropies = torch.full((4, 4), 0.5, dtype=torch.float64)
    estimates = estimate_prompt(stats, step_entropies, running_positions=[2, 4])

    pooled = pool_prompts([estimates, estimates, estimates], BootstrapConfig(samples=50))

    assert estimates.ce_star_se == 0.0
    assert math.isnan(estimates.mc_variance_ratio)
    assert math.isnan(estimates.rho_pearson)
    assert estimates.conveyance == 0.0
    assert estimates.running_entropy_rate == {2: 0.5, 4: 0.5}
    assert math.isnan(pooled.mc_variance_ratio)
    assert pooled.intervals["ce_star"] == (2.0, 2.0)
    assert len([reason for reason in pooled.undefined if "variance ratio" in reason]) == 1


def test_equal_lengths_correlation_nan_buckets_defined():
    estimates = estimate_prompt(stats_from([5, 5, 5, 5, 5, 5], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))

    assert math.isnan(estimates.rho_spearman)
    assert estimates.length_rate_covariance == 0.0
    assert "length-rate correlation undefined: length is the same for every rollout" in estimates.undefined
    assert estimates.mean_length_short == estimates.mean_length_long == 5.0
    assert estimates.entropy_rate_short == pytest.approx(0.3)
    assert estimates.entropy_rate_long == pytest.approx(1.1)


def test_single_prompt_intervals_nan_with_one_reason():
    estimates = mixed_prompts(count=2)[:1]

    pooled = pool_prompts(estimates, BootstrapConfig(samples=50))
    change = paired_change(estimates, estimates, BootstrapConfig(samples=50))

    assert pooled.intervals == {}
    assert pooled.confidence is None
    assert pooled.undefined[BOOTSTRAP_REASON] == 1
    assert change["ce_star"].delta == 0.0
    assert math.isnan(change["ce_star"].ci_low)
    assert math.isnan(change["ce_star"].ci_high)


def test_running_position_past_every_rollout():
    generator = torch.Generator().manual_seed(4)
    estimates = [make_prompt(generator, truncated_count=2, running_positions=(12, 30)) for _ in range(3)]

    pooled = pool_prompts(estimates, BootstrapConfig(samples=50))

    assert all(math.isnan(e.running_entropy_rate[30]) for e in estimates)
    assert all(e.running_active_share[30] == 0.0 for e in estimates)
    assert math.isnan(pooled.running_entropy_rate[30])
    assert pooled.running_active_share[30] == 0.0
    assert math.isfinite(pooled.running_entropy_rate[12])
    reasons = [reason for reason in pooled.undefined if "token 30" in reason]
    assert len(reasons) == 1
    assert all(math.isnan(bound) for bound in pooled.intervals["running_entropy_rate_30"])


def test_running_rate_nan_has_prompt_reason():
    # A prompt whose rollouts never reach t has a NaN running rate, and the docstring
    # of `PromptEstimates.undefined` promises a reason for every NaN figure.
    generator = torch.Generator().manual_seed(5)
    estimates = make_prompt(generator, truncated_count=0, running_positions=(1, 30))

    assert math.isnan(estimates.running_entropy_rate[30])
    assert any("30" in reason for reason in estimates.undefined)


@pytest.mark.parametrize("confidence", [1e-9, 0.5, 1 - 1e-9])
def test_confidence_extremes_do_not_raise(confidence):
    estimates = mixed_prompts()

    pooled = pool_prompts(estimates, BootstrapConfig(samples=200, confidence=confidence))

    low, high = pooled.intervals["ce_star"]
    assert low <= high
    wide = pool_prompts(estimates, BootstrapConfig(samples=200, confidence=1 - 1e-9)).intervals["ce_star"]
    narrow = pool_prompts(estimates, BootstrapConfig(samples=200, confidence=1e-9)).intervals["ce_star"]
    assert wide[0] <= low <= narrow[0]
    assert narrow[1] <= high <= wide[1]
    assert narrow[1] - narrow[0] == pytest.approx(0.0, abs=1e-6)


def test_zero_bootstrap_samples_means_no_intervals():
    pooled = pool_prompts(mixed_prompts(), BootstrapConfig(samples=0))

    assert pooled.intervals == {}
    assert pooled.confidence is None
    assert pooled.bootstrap_samples == 0
    assert not any(name.endswith(("_ci_low", "_ci_high")) for name in scalar_metrics(pooled))


def test_one_bootstrap_sample_is_rejected():
    # One resample cannot give a percentile interval; a zero-width interval at that
    # resample's value would look like certainty.
    with pytest.raises(ValueError, match="at least 2"):
        BootstrapConfig(samples=1)


def test_nan_prompts_mixed_with_defined_ones():
    generator = torch.Generator().manual_seed(6)
    defined = [make_prompt(generator) for _ in range(3)]
    constant_length = estimate_prompt(stats_from([4, 4, 4, 4, 4, 4, 4, 4], [1.0, 2, 3, 4, 5, 6, 7, 8]))
    estimates = defined + [constant_length]

    pooled = pool_prompts(estimates, BootstrapConfig(samples=200))

    z = [math.atanh(e.rho_pearson) for e in defined]
    assert pooled.rho_length_rate == pytest.approx(math.tanh(sum(z) / 3))
    assert pooled.rho_length_rate_kendall == pytest.approx(sum(e.rho_kendall for e in defined) / 3)
    assert pooled.ce_star == pytest.approx(sum(e.ce_star for e in estimates) / 4)
    assert pooled.undefined["length-rate correlation undefined: length is the same for every rollout"] == 1
    low, high = pooled.intervals["rho_length_rate"]
    assert -1 <= low <= high <= 1


# ---------------------------------------------------------------------------
# Identities


def test_decomposition_holds_everywhere():
    estimates = mixed_prompts()

    pooled = pool_prompts(estimates, BootstrapConfig(samples=50))

    for e in estimates:
        assert e.length_driven + e.conveyance == pytest.approx(e.ce_star, rel=1e-12)
        if e.completed is not None:
            completed = e.completed
            assert completed.length_driven + completed.conveyance == pytest.approx(completed.ce_star, rel=1e-12)
    assert pooled.length_driven + pooled.conveyance == pytest.approx(pooled.ce_star, rel=1e-12)
    completed = pooled.completed
    assert completed.length_driven + completed.conveyance == pytest.approx(completed.ce_star, rel=1e-12)
    assert completed.num_prompts == len(estimates) - 1


def test_running_rate_at_common_length_is_entropy_rate():
    generator = torch.Generator().manual_seed(7)
    estimates = []
    for _ in range(3):
        step_entropies = torch.rand(5, 6, generator=generator, dtype=torch.float64)  # [M, K]
        lengths = torch.full((5,), 6)
        truncated = torch.tensor([True, False, False, True, False])
        stats = summarize_rollouts(step_entropies, -step_entropies, lengths, truncated)
        estimates.append(estimate_prompt(stats, step_entropies, running_positions=[6]))

    pooled = pool_prompts(estimates)

    for e in estimates:
        assert e.running_entropy_rate[6] == pytest.approx(e.entropy_rate, rel=1e-12)
        assert e.completed.running_entropy_rate[6] == pytest.approx(e.completed.entropy_rate, rel=1e-12)
    assert pooled.running_entropy_rate[6] == pytest.approx(pooled.entropy_rate, rel=1e-12)
    assert pooled.completed.running_entropy_rate[6] == pytest.approx(pooled.completed.entropy_rate, rel=1e-12)


def test_change_against_itself_is_zero_for_every_figure():
    estimates = mixed_prompts()

    change = paired_change(estimates, estimates, BootstrapConfig(samples=100))

    assert "completed/ce_star" in change
    assert "running_entropy_rate_4" in change
    for name, figure in change.items():
        if math.isnan(figure.before):
            assert math.isnan(figure.delta), name
            continue
        assert figure.delta == 0.0, name
        assert (figure.ci_low, figure.ci_high) == (0.0, 0.0), name


def test_intervals_independent_of_requested_figures():
    generator = torch.Generator().manual_seed(8)
    with_running = [make_prompt(generator, truncated_count=2) for _ in range(6)]
    without_running = [
        PromptEstimates.from_dict({**e.to_dict(), "running_entropy_rate": {}, "running_active_share": {}})
        for e in with_running
    ]
    bootstrap = BootstrapConfig(samples=300, seed=11)

    full = pool_prompts(with_running, bootstrap)
    reduced = pool_prompts(without_running, bootstrap)
    again = pool_prompts(with_running, bootstrap)
    other_seed = pool_prompts(with_running, BootstrapConfig(samples=300, seed=12))

    for name, bounds in reduced.intervals.items():
        torch.testing.assert_close(torch.tensor(full.intervals[name]), torch.tensor(bounds), rtol=0, atol=0, equal_nan=True)
    assert again.intervals.keys() == full.intervals.keys()
    for name, bounds in again.intervals.items():
        torch.testing.assert_close(torch.tensor(full.intervals[name]), torch.tensor(bounds), rtol=0, atol=0, equal_nan=True)
    assert other_seed.intervals["ce_star"] != full.intervals["ce_star"]


def test_change_interval_matches_pooled_resamples():
    # The paired interval of a change and the interval of each side use the same
    # resampled prompts, so a constant shift of every prompt moves the interval by it.
    before = mixed_prompts(seed=9)
    after = [
        PromptEstimates.from_dict({**e.to_dict(), "ce_star": e.ce_star + 0.25}) for e in before
    ]
    bootstrap = BootstrapConfig(samples=200, seed=3)

    change = paired_change(before, after, bootstrap)
    interval_before = pool_prompts(before, bootstrap).intervals["ce_star"]
    interval_after = pool_prompts(after, bootstrap).intervals["ce_star"]

    assert change["ce_star"].delta == pytest.approx(0.25)
    assert change["ce_star"].ci_low == pytest.approx(0.25)
    assert change["ce_star"].ci_high == pytest.approx(0.25)
    assert interval_after[0] == pytest.approx(interval_before[0] + 0.25)
    assert interval_after[1] == pytest.approx(interval_before[1] + 0.25)


# ---------------------------------------------------------------------------
# Units


def test_scalar_metrics_bits_scale_only_entropies():
    before = mixed_prompts(seed=10)
    after = mixed_prompts(seed=11)
    pooled = pool_prompts(after, BootstrapConfig(samples=50))
    change = paired_change(before, after, BootstrapConfig(samples=50))

    nats = scalar_metrics(pooled, units="nats", change=change)
    bits = scalar_metrics(pooled, units="bits", change=change)

    assert nats.keys() == bits.keys()
    assert "canopy/completed/running_entropy_rate_4_ci_high" in nats
    assert "canopy/change/rho_length_rate_ci_low" in nats
    for name, value in nats.items():
        if math.isnan(value):
            assert math.isnan(bits[name]), name
        elif has_entropy_unit(name):
            assert bits[name] == pytest.approx(value / LN2, rel=1e-12), name
        else:
            assert bits[name] == value, name


def json_leaves(document, path=()):
    if isinstance(document, dict):
        for key, value in document.items():
            yield from json_leaves(value, path + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from json_leaves(value, path + (index,))
    else:
        yield path, document


def reject_constant(name):
    raise AssertionError(f"the JSON contains the non-standard constant {name}")


@pytest.fixture(scope="module")
def ending_model_dir(tmp_path_factory):
    """A tiny model with ten end-of-sequence ids, so most rollouts end before a cap of 20."""
    path = tmp_path_factory.mktemp("ending-model")
    make_model(seed=3, eos_token_id=list(range(2, 12))).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [{"prompt": text} for text in HELDOUT[:3]] + [{"prompt": [{"role": "user", "content": "tell me a story"}]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def run_evaluate(model_dir, prompts_path, output, *options):
    return main(
        ["evaluate", "--model", str(model_dir), "--prompts", str(prompts_path), "--device", "cpu", *options,
         "--output", str(output)]
    )


def test_evaluate_bits_scale_exactly_the_entropies(ending_model_dir, prompts_path, tmp_path):
    options = ["--rollouts", "6", "--max-new-tokens", "20", "--running-positions", "1,4,16,20", "--bootstrap-samples", "50"]
    reports = {}
    for units in ("nats", "bits"):
        output = tmp_path / f"{units}.json"
        assert run_evaluate(ending_model_dir, prompts_path, output, *options, "--units", units) == 0
        reports[units] = json.loads(output.read_text(), parse_constant=reject_constant)

    nats = dict(json_leaves(reports["nats"]))
    bits = dict(json_leaves(reports["bits"]))
    assert nats.keys() == bits.keys()
    assert isinstance(reports["nats"]["pooled"]["completed"], dict)
    checked = 0
    for path, value in nats.items():
        # The settings and the wall time are not figures.
        if path[0] in ("config", "seconds") or not isinstance(value, float):
            continue
        keys = [key for key in path if isinstance(key, str)]
        # A running figure is stored as {"<t>": value}, an interval as {name: [low, high]}.
        if "running_entropy_rate" in keys:
            entropy_valued = True
        elif "running_active_share" in keys or keys[-1] == "confidence":
            entropy_valued = False
        else:
            entropy_valued = has_entropy_unit(keys[-1])
        if entropy_valued:
            assert bits[path] == pytest.approx(value / LN2, rel=1e-12), path
        else:
            assert bits[path] == value, path
        checked += 1
    assert checked > 200


# ---------------------------------------------------------------------------
# Evaluate JSON and logs


@pytest.fixture(scope="module")
def capped_model_dir(tmp_path_factory):
    """A tiny model whose generation config suppresses its only end-of-sequence id."""
    path = tmp_path_factory.mktemp("capped-model")
    model = make_model(seed=4)
    model.generation_config.suppress_tokens = [2]
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_evaluate_all_truncated_strict_json(capped_model_dir, prompts_path, tmp_path, caplog):
    output = tmp_path / "capped.json"

    with caplog.at_level(logging.WARNING):
        code = run_evaluate(capped_model_dir, prompts_path, output, "--rollouts", "3", "--max-new-tokens", "4")

    assert code == 0
    report = json.loads(output.read_text(), parse_constant=reject_constant)
    assert report["pooled"]["truncation_rate"] == 1.0
    assert len(report["warnings"]) == 1
    assert "length cap of 4 tokens" in report["warnings"][0]
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(messages) == len(set(messages))
    assert sum(COMPLETED_REASON in message for message in messages) == 1
    for prompt in report["prompts"]:
        assert prompt["completed"] is None
        assert all(rollout["truncated"] for rollout in prompt["rollouts"])


def test_evaluate_all_truncated_keeps_completed_figures(capped_model_dir, prompts_path, tmp_path):
    # Every figure is present in the JSON, NaN as null, so a reader never has to
    # guess whether a figure was left out or is undefined.
    output = tmp_path / "capped.json"

    assert run_evaluate(capped_model_dir, prompts_path, output, "--rollouts", "3", "--max-new-tokens", "4") == 0

    completed = json.loads(output.read_text())["pooled"]["completed"]
    assert isinstance(completed, dict)
    assert completed["ce_star"] is None
    assert completed["num_prompts"] == 0


def warning_messages(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)


def test_evaluate_logs_reasons_of_completed_figures(ending_model_dir, prompts_path, tmp_path, caplog):
    # With a cap of 14, a few rollouts reach the cap, and with this seed none ends
    # exactly at token 14, so the completed-only running rate at 14 is NaN while the
    # one over all rollouts is not.
    output = tmp_path / "reasons.json"

    with caplog.at_level(logging.WARNING):
        code = run_evaluate(
            ending_model_dir, prompts_path, output, "--rollouts", "8", "--max-new-tokens", "14",
            "--running-positions", "14", "--bootstrap-samples", "20", "--seed", "0",
        )

    assert code == 0
    pooled = json.loads(output.read_text())["pooled"]
    completed_reasons = pooled["completed"]["undefined"]
    assert pooled["running_entropy_rate"]["14"] is not None
    assert pooled["completed"]["running_entropy_rate"]["14"] is None
    assert completed_reasons
    logged = warning_messages(caplog)
    for reason in completed_reasons:
        assert reason in logged, reason


# ---------------------------------------------------------------------------
# Bad options


EVALUATE_OPTIONS = ["--units", "--bootstrap-samples", "--confidence", "--running-positions", "--truncation-warning"]


@pytest.mark.parametrize(
    "option, value",
    [
        ("--confidence", "1.5"),
        ("--confidence", "nan"),
        ("--confidence", "0"),
        ("--bootstrap-samples", "-1"),
        ("--running-positions", "0"),
        ("--running-positions", "16,,32"),
        ("--running-positions", "99"),
        ("--truncation-warning", "2"),
        ("--truncation-warning", "nan"),
    ],
)
def test_evaluate_bad_option_names_only_it(option, value, prompts_path, tmp_path, capsys):
    output = tmp_path / "never.json"

    # The model path does not exist: the option must fail before any model work.
    code = main(
        ["evaluate", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts_path), "--max-new-tokens", "64",
         f"{option}={value}", "--output", str(output)]
    )

    assert code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert len(error.strip().splitlines()) == 1
    assert option in error
    for other in EVALUATE_OPTIONS:
        if other != option:
            assert other not in error, other
    assert not output.exists()


def make_trainer(output_dir: Path, *, max_steps: int = 1, model=None):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        max_length=64,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return SFTTrainer(
        model=model if model is not None else make_model(seed=0),
        args=args,
        train_dataset=toy_conversations(),
        processing_class=make_tokenizer(),
    )


def read_history(output_dir: Path) -> list[dict]:
    path = output_dir / "canopy_monitor" / "history.jsonl"
    return [json.loads(line, parse_constant=reject_constant) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trainer_for_options(tmp_path_factory):
    return make_trainer(tmp_path_factory.mktemp("options"))


@pytest.mark.parametrize(
    "option, value",
    [
        ("units", "shannons"),
        ("bootstrap_samples", -1),
        ("bootstrap_samples", 2.5),
        ("confidence", 1.5),
        ("confidence", float("nan")),
        ("running_positions", [0]),
        ("running_positions", [16, 64]),
        ("running_positions", 16),
        ("running_positions", "16,32"),
        ("truncation_warning", 1.5),
        ("truncation_warning", float("nan")),
    ],
    ids=lambda value: repr(value),
)
def test_callback_bad_option_names_it(option, value, trainer_for_options):
    with pytest.raises(ValueError) as raised:
        CanopyMonitorCallback(trainer_for_options, prompts=HELDOUT, max_new_tokens=32, **{option: value})

    assert option in str(raised.value)


def test_callback_accepts_numpy_scalars(trainer_for_options):
    callback = CanopyMonitorCallback(
        trainer_for_options,
        prompts=HELDOUT,
        max_new_tokens=32,
        bootstrap_samples=np.int64(100),
        confidence=np.float32(0.9),
        truncation_warning=np.float64(0.5),
        running_positions=[np.int64(16)],
    )

    assert callback.bootstrap.samples == 100
    assert callback.running_positions == (16,)


def test_summary_line_keeps_confidence_digits():
    pooled = pool_prompts(mixed_prompts(), BootstrapConfig(samples=100, confidence=0.999))

    line = summary_line(SimpleNamespace(pooled=pooled, seconds=0.0), "nats")

    assert "100% interval" not in line
    assert "99.9%" in line


def test_truncation_warning_shows_small_threshold():
    measurement = SimpleNamespace(pooled=SimpleNamespace(truncation_rate=0.5), config=SamplingConfig(max_new_tokens=8))

    message = truncation_warning(measurement, 0.004)

    assert message is not None
    assert "threshold 0%" not in message


# ---------------------------------------------------------------------------
# Callback history and logs


def test_callback_history_round_trips_in_bits(tmp_path):
    histories = {}
    for units in ("nats", "bits"):
        trainer = make_trainer(tmp_path / units)
        trainer.add_callback(
            CanopyMonitorCallback(
                trainer, prompts=HELDOUT, every_n_steps=1, num_rollouts=4, max_new_tokens=8, units=units,
                running_positions=[1, 8], bootstrap_samples=50,
            )
        )
        trainer.train()
        histories[units] = read_history(tmp_path / units)

    assert [record["step"] for record in histories["bits"]] == [0, 1]
    for record_nats, record_bits in zip(histories["nats"], histories["bits"]):
        assert record_nats["metrics"].keys() == record_bits["metrics"].keys()
        for name, value in record_nats["metrics"].items():
            if value is None or name in ("canopy/monitor_seconds", "canopy/monitor_time_share"):
                continue
            if has_entropy_unit(name):
                assert record_bits["metrics"][name] == pytest.approx(value / LN2, rel=1e-12), name
            else:
                assert record_bits["metrics"][name] == value, name
        for prompt, values_nats, values_bits in zip(HELDOUT, record_nats["prompts"], record_bits["prompts"]):
            assert values_bits["prompt"] == prompt
            rebuilt_bits = PromptEstimates.from_dict(values_bits)
            assert json_safe(rebuilt_bits.to_dict()) == {key: value for key, value in values_bits.items() if key != "prompt"}
            rebuilt_nats = PromptEstimates.from_dict(convert_nested(values_bits, "nats", from_units="bits"))
            assert rebuilt_nats.ce_star == pytest.approx(values_nats["ce_star"], rel=1e-12)
            assert rebuilt_nats.running_entropy_rate[1] == pytest.approx(values_nats["running_entropy_rate"]["1"], rel=1e-12)
            assert rebuilt_nats.running_active_share == {int(t): s for t, s in values_nats["running_active_share"].items()}


def test_callback_without_bootstrap_logs_no_intervals(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.add_callback(
        CanopyMonitorCallback(trainer, prompts=HELDOUT, every_n_steps=1, num_rollouts=4, max_new_tokens=8, bootstrap_samples=0)
    )

    trainer.train()

    first, second = read_history(tmp_path)
    assert "canopy/change/ce_star" in second["metrics"]
    for record in (first, second):
        intervals = [name for name in record["metrics"] if name.endswith(("_ci_low", "_ci_high"))]
        assert intervals == []


def test_callback_logs_reasons_of_completed_figures(tmp_path, caplog):
    trainer = make_trainer(tmp_path)
    # With this seed some prompts have both completed and truncated rollouts at cap 8.
    callback = CanopyMonitorCallback(
        trainer, prompts=HELDOUT, every_n_steps=1, num_rollouts=4, max_new_tokens=8, bootstrap_samples=20, seed=1
    )
    trainer.add_callback(callback)

    with caplog.at_level(logging.WARNING):
        trainer.train()

    history = read_history(tmp_path)
    nan_completed = [name for record in history for name, value in record["metrics"].items() if value is None and "/completed/" in name]
    assert nan_completed
    reasons = {
        reason for record in history for prompt in record["prompts"] if prompt["completed"] is not None
        for reason in prompt["completed"]["undefined"]
    }
    assert reasons
    logged = warning_messages(caplog)
    for reason in reasons:
        assert reason in logged, reason


# ---------------------------------------------------------------------------
# Exact tree walker


WORDS = ["</s>", "<end>", "a", "b", "c"]


def make_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={word: index for index, word in enumerate(WORDS)}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="a")


def make_word_model(seed=1, eos_token_id=0, **generation):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=eos_token_id,
        pad_token_id=None, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    model.generation_config.eos_token_id = eos_token_id
    for name, value in generation.items():
        setattr(model.generation_config, name, value)
    return model


def enumerate_tree(model, prompt_ids, cap, eos_ids, processors):
    """Walk the rollout tree with plain forward passes, applying `processors` by hand."""
    totals = {"ce_star": 0.0, "mean_length": 0.0, "truncation": 0.0}

    def visit(prefix, probability):
        input_ids = torch.tensor([prompt_ids + prefix])
        with torch.no_grad():
            logits = model(input_ids).logits[:, -1, :].float()  # [1, V]
        logprobs = torch.log_softmax(processors(input_ids, logits).double(), dim=-1)[0]  # [V]
        probabilities = logprobs.exp()
        totals["ce_star"] += probability * float(-torch.where(probabilities > 0, probabilities * logprobs, 0.0).sum())
        for token, token_probability in enumerate(probabilities.tolist()):
            if token_probability == 0:
                continue
            child = probability * token_probability
            length = len(prefix) + 1
            if token in eos_ids or length == cap:
                totals["mean_length"] += child * length
                totals["truncation"] += child if token not in eos_ids else 0.0
            else:
                visit(prefix + [token], child)

    visit([], 1.0)
    return totals


def test_exact_matches_hand_enumeration_with_processors():
    from transformers import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    model = make_word_model(repetition_penalty=1.7, no_repeat_ngram_size=2)
    tokenizer = make_word_tokenizer()
    prompt = Prompt(text="a b c")
    config = SamplingConfig(max_new_tokens=4, temperature=0.8, top_k=4, use_chat_template=False, batch_size=3)
    prompt_ids = encode_prompts(tokenizer, [prompt], use_chat_template=False, max_new_tokens=4, context_length=64)[0]
    processors = LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(1.7), NoRepeatNGramLogitsProcessor(2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(4)]
    )
    model.eval()
    expected = enumerate_tree(model, prompt_ids, 4, {0}, processors)

    tree = exact_canopy(model, tokenizer, prompt, config)
    rechunked = exact_canopy(model, tokenizer, prompt, SamplingConfig(**{**config.to_dict(), "batch_size": 1000}))

    assert tree.ce_star == pytest.approx(expected["ce_star"], rel=1e-7)
    assert tree.mean_length == pytest.approx(expected["mean_length"], rel=1e-7)
    assert tree.truncation_probability == pytest.approx(expected["truncation"], rel=1e-7)
    assert tree.probability_mass == pytest.approx(1.0, abs=1e-9)
    assert rechunked.ce_star == pytest.approx(tree.ce_star, rel=1e-7)
    assert rechunked.num_nodes == tree.num_nodes


def test_exact_chat_prompt_equals_rendered_text():
    model = make_model(seed=2)
    tokenizer = make_tokenizer()
    messages = [{"role": "user", "content": "hello world"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    chat = exact_canopy(model, tokenizer, Prompt(messages=messages), SamplingConfig(max_new_tokens=2))
    text = exact_canopy(model, tokenizer, Prompt(text=rendered), SamplingConfig(max_new_tokens=2, use_chat_template=False))

    assert chat.ce_star == pytest.approx(text.ce_star, rel=1e-9)
    assert chat.num_nodes == text.num_nodes == 1 + len(tokenizer.get_vocab()) - 1


def test_exact_rejects_end_id_outside_vocabulary():
    # Id 7 does not exist in a 5-token vocabulary, so no rollout could ever end.
    # Without an error the walker would describe a process that only the cap stops.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={word: index for index, word in enumerate(WORDS)}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="a")
    model = make_word_model(eos_token_id=None)

    with pytest.raises(ValueError, match="7"):
        exact_canopy(model, tokenizer, Prompt(text="a b"), SamplingConfig(max_new_tokens=3, use_chat_template=False), eos_token_ids=[7])


def test_exact_too_large_tree_restores_model():
    model = make_word_model(suppress_tokens=[4])
    model.train()
    generation_config = model.generation_config
    state = torch.random.get_rng_state()
    config = SamplingConfig(max_new_tokens=12, use_chat_template=False)

    with pytest.raises(ValueError, match="max_nodes=50"):
        exact_canopy(model, make_word_tokenizer(), Prompt(text="a b"), config, max_nodes=50)

    assert model.generation_config is generation_config
    assert model.generation_config.suppress_tokens == [4]
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), state)
