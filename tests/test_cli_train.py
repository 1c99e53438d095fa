import json
from pathlib import Path

import pytest

from canopy_monitor.cli.main import main

from wandb_records import history_rows


@pytest.fixture
def recipe(tmp_path, model_dir):
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": text}) for text in ["hello world", "tell me a story", "what is a list"]))
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""\
model: {model_dir}
dataset: {{name: python-docstrings, num_examples: 16, seed: 0}}
peft: {{r: 4, lora_alpha: 8, lora_dropout: 0.0, target_modules: [q_proj, v_proj]}}
monitor: {{prompts: {prompts}, every_n_steps: 2, num_rollouts: 4, max_new_tokens: 8, seed: 0}}
training:
  output_dir: {tmp_path / "run"}
  max_steps: 3
  per_device_train_batch_size: 4
  learning_rate: 1.0e-3
  max_length: 64
  logging_steps: 1
  save_strategy: "no"
  bf16: false
  activation_checkpointing: false
  use_cpu: true
  disable_tqdm: true
  report_to: [wandb]
"""
    )
    return path


def test_train_end_to_end_with_wandb(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)

    code = main(["train", str(recipe), "--max_steps", "3"])

    assert code == 0
    run_dir = tmp_path / "run"
    history = [json.loads(line) for line in (run_dir / "canopy_monitor" / "history.jsonl").read_text().splitlines()]
    assert [record["step"] for record in history] == [0, 2, 3]
    assert all("canopy/ce_star" in record["metrics"] for record in history)
    assert all("canopy/rho_length_rate" in record["metrics"] for record in history)

    # W&B files go under the output directory, and the run contains the scalars at each point.
    run_files = list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert len(run_files) == 1
    rows = [row for row in history_rows(run_files[0]) if "train/canopy/ce_star" in row]
    assert [int(float(row["train/global_step"])) for row in rows] == [0, 2, 3]

    output = capsys.readouterr().out
    assert str(run_dir / "canopy_monitor" / "history.jsonl") in output
    assert "wandb sync" in output
    assert "canopy/ce_star:" in output
    assert (run_dir / "recipe.yaml").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--num_rollouts", "1"], "num_rollouts"),
        (["--max_stepz", "3"], "max_steps"),
        (["--prompts", "/nonexistent/prompts.jsonl"], "not found"),
        (["--model", "/nonexistent/model-dir"], "not found"),
        (["--every_n_steps", "0"], "every_n_steps"),
    ],
)
def test_train_bad_input_exits_before_training(extra, expected, recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)

    code = main(["train", str(recipe), *extra])

    assert code == 2
    error = capsys.readouterr().err
    assert expected in error
    assert "Traceback" not in error
    assert not (tmp_path / "run" / "canopy_monitor").exists()


def test_train_missing_recipe(tmp_path, capsys):
    code = main(["train", str(tmp_path / "missing.yaml")])

    assert code == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_shipped_recipe_parses():
    from canopy_monitor.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "sft-smollm2-cpu.yaml")

    assert recipe.model == "smollm2-135m-instruct"
    assert recipe.training["report_to"] == ["wandb"]
    assert recipe.monitor.num_rollouts >= 2
