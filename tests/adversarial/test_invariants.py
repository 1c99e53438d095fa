"""Invariants of the figures on real sampler output and in the evaluate JSON."""

import json
import math
import random

import numpy as np
import pytest
import torch

from canopy_monitor.cli.main import main
from canopy_monitor.config import SamplingConfig
from canopy_monitor.measurement import measure
from canopy_monitor.prompts import load_prompts
from canopy_monitor.sampling import preserved_state, sample_rollouts

from conftest import VOCAB_WORDS, make_model, make_tokenizer

PROMPTS = [
    "what is the sum of two plus two ?",
    "tell me a story",
    "hello world",
    [{"role": "system", "content": "answer ."}, {"role": "user", "content": "how do i write a python function"}],
]
LOG_V = math.log(len(VOCAB_WORDS))
POLICIES = [
    dict(),
    dict(temperature=3.0),
    dict(temperature=0.3),
    dict(top_k=5),
    dict(top_p=0.5),
    dict(temperature=2.0, top_k=7, top_p=0.9),
    dict(temperature=1e-9),
]
LINEAR_FIGURES = ["ce_star", "ce_star_mc", "mean_length", "entropy_rate", "truncation_rate", "length_driven", "conveyance"]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda policy: ",".join(f"{k}={v}" for k, v in policy.items()) or "plain")
@pytest.mark.parametrize("eos", [2, [2, 3]], ids=["one-eos", "two-eos"])
def test_rollout_invariants(policy, eos):
    max_new_tokens = 12
    config = SamplingConfig(num_rollouts=6, max_new_tokens=max_new_tokens, batch_size=12, seed=1, **policy)
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    model = make_model(seed=3, eos_token_id=eos)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # a peakier policy, so that rollouts end at various lengths

    measurement = measure(model, make_tokenizer(), load_prompts(PROMPTS), config)

    for rollouts, estimates in zip(measurement.rollouts, measurement.estimates):
        stats = rollouts.stats
        assert stats.lengths.min() >= 1
        assert stats.lengths.max() <= max_new_tokens
        for ids, length, truncated in zip(rollouts.token_ids, stats.lengths.tolist(), stats.truncated.tolist()):
            assert len(ids) == length
            has_end = any(token in eos_ids for token in ids)
            assert truncated == (not has_end)
            if has_end:
                assert ids[-1] in eos_ids and not any(token in eos_ids for token in ids[:-1])
            else:
                assert length == max_new_tokens
        h = rollouts.step_entropies
        assert torch.isfinite(h).all()
        assert (h >= -1e-6).all()
        assert (h <= LOG_V + 1e-5).all()
        torch.testing.assert_close(h.double().sum(dim=1), stats.entropy_sums, rtol=1e-6, atol=1e-6)
        assert (stats.surprisal_sums >= -1e-6).all()
        assert estimates.length_driven + estimates.conveyance == pytest.approx(estimates.ce_star, rel=1e-9, abs=1e-12)
        assert estimates.truncation_rate == pytest.approx(stats.truncated.double().mean().item())

    pooled = measurement.pooled
    for name in LINEAR_FIGURES:
        per_prompt = [getattr(estimates, name) for estimates in measurement.estimates]
        assert getattr(pooled, name) == pytest.approx(sum(per_prompt) / len(per_prompt), rel=1e-12, abs=1e-12)
    assert pooled.length_driven + pooled.conveyance == pytest.approx(pooled.ce_star, rel=1e-9, abs=1e-12)
    assert pooled.branching_factor == pytest.approx(math.exp(pooled.entropy_rate))
    assert pooled.generation_perplexity == pytest.approx(math.exp(pooled.ce_star / pooled.mean_length))


def test_invariants_with_extreme_temperatures():
    # Near-greedy and near-uniform policies stay finite and inside [0, log V].
    for temperature in (1e-30, 1e30):
        config = SamplingConfig(num_rollouts=3, max_new_tokens=5, temperature=temperature)
        measurement = measure(make_model(), make_tokenizer(), load_prompts(PROMPTS[:2]), config)
        for rollouts in measurement.rollouts:
            assert torch.isfinite(rollouts.step_entropies).all()
            assert (rollouts.step_entropies >= 0).all()
            assert (rollouts.step_entropies <= LOG_V + 1e-5).all()


def test_global_random_states_untouched_by_a_measurement():
    model, tokenizer, prompts = make_model(), make_tokenizer(), load_prompts(PROMPTS)  # make_model seeds torch
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected_python = random.random()
    expected_numpy = np.random.rand()
    expected_torch = torch.rand(3)
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)

    measure(model, tokenizer, prompts, SamplingConfig(num_rollouts=3, max_new_tokens=6))

    assert random.random() == expected_python
    assert np.random.rand() == expected_numpy
    assert torch.equal(torch.rand(3), expected_torch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_model_keeps_cuda_random_state():
    # Only the model's CUDA device is forked and restored, so seeding must not touch
    # any other CUDA device.
    states = torch.cuda.get_rng_state_all()

    with preserved_state(make_model(), seed=0):
        pass

    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), states))


def test_same_seed_same_rollouts():
    config = SamplingConfig(num_rollouts=4, max_new_tokens=8, seed=7)
    model, tokenizer = make_model(), make_tokenizer()
    first = sample_rollouts(model, tokenizer, load_prompts(PROMPTS), config)
    second = sample_rollouts(model, tokenizer, load_prompts(PROMPTS), config)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]


def test_evaluate_json_is_strict_and_pooled_are_means(tmp_path):
    model_dir = tmp_path / "model"
    model = make_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS))
    output = tmp_path / "out.json"

    code = main(
        ["evaluate", "--model", str(model_dir), "--prompts", str(prompts), "--rollouts", "2",
         "--max-new-tokens", "3", "--output", str(output)]
    )

    assert code == 0
    text = output.read_text()

    def reject(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    report = json.loads(text, parse_constant=reject)
    # With M = 2 every correlation is undefined, so nulls must appear.
    assert report["pooled"]["rho_length_rate"] is None
    entries = report["prompts"]
    assert len(entries) == len(PROMPTS)
    for name in LINEAR_FIGURES:
        values = [entry[name] for entry in entries]
        assert report["pooled"][name] == pytest.approx(sum(values) / len(values), rel=1e-12, abs=1e-12)
    for entry in entries:
        rollouts = entry["rollouts"]
        assert entry["ce_star"] == pytest.approx(sum(r["entropy_sum"] for r in rollouts) / len(rollouts))
        assert entry["ce_star_mc"] == pytest.approx(sum(r["surprisal_sum"] for r in rollouts) / len(rollouts))
        assert entry["mean_length"] == pytest.approx(sum(r["length"] for r in rollouts) / len(rollouts))
        for rollout in rollouts:
            assert 1 <= rollout["length"] <= 3
            assert rollout["entropy_rate"] == pytest.approx(rollout["entropy_sum"] / rollout["length"])
            assert 0 <= rollout["entropy_sum"] <= 3 * LOG_V + 1e-6
            if rollout["truncated"]:
                assert rollout["length"] == 3
    assert entries[3]["messages"][0]["role"] == "system"
    assert entries[3]["prompt"] == "how do i write a python function"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_model_invariants(dtype, tmp_path):
    """SmolLM2-135M-Instruct, 2 prompts x 3 rollouts, cap 16: the same invariants on a real model."""
    pytest.importorskip("gguf")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Name a colour."}) + "\n"
        + json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]}) + "\n"
    )
    output = tmp_path / "out.json"

    code = main(
        ["evaluate", "--prompts", str(prompts), "--rollouts", "3", "--max-new-tokens", "16", "--dtype", dtype,
         "--device", "cpu", "--output", str(output)]
    )

    assert code == 0
    report = json.loads(output.read_text(), parse_constant=lambda constant: pytest.fail(constant))
    log_v = math.log(49152)  # SmolLM2's vocabulary
    for entry in report["prompts"]:
        assert entry["length_driven"] + entry["conveyance"] == pytest.approx(entry["ce_star"], rel=1e-9, abs=1e-12)
        for rollout in entry["rollouts"]:
            assert 1 <= rollout["length"] <= 16
            assert 0 <= rollout["entropy_sum"] <= rollout["length"] * log_v
            assert math.isfinite(rollout["surprisal_sum"])
            assert rollout["surprisal_sum"] >= 0
            if rollout["truncated"]:
                assert rollout["length"] == 16
    for name in LINEAR_FIGURES:
        values = [entry[name] for entry in report["prompts"]]
        assert report["pooled"][name] == pytest.approx(sum(values) / len(values), rel=1e-12, abs=1e-12)
