import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from canopy_monitor.cli.main import main

from conftest import VOCAB_WORDS
from hub_stand_ins import write_capybara, write_gsm8k, write_ultrafeedback
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
    # The LoRA adapter is saved in the output directory, loadable on its base model.
    assert f"Fine-tuned model: {run_dir}" in output
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    assert (run_dir / "adapter_model.safetensors").exists()


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


# Recipes of the other trainers, and the GPU recipes with local stand-ins

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

# Shrinks a shipped recipe to a few seconds on the tiny test model.
SMOKE_OVERRIDES = [
    "--max_steps", "2",
    "--logging_steps", "1",
    "--every_n_steps", "1",
    "--num_prompts", "2",
    "--num_rollouts", "2",
    "--max_new_tokens", "4",
    "--semantic_every_n_points", "0",
    "--bootstrap_samples", "0",
    "--per_device_train_batch_size", "2",
    "--num_examples", "4",
    "--bf16", "false",
    "--use_cpu",
    "--disable_tqdm",
]
GENERATION_OVERRIDES = ["--num_generations", "2", "--max_completion_length", "4"]


def read_history(run_dir):
    lines = (run_dir / "canopy_monitor" / "history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def read_log(run_dir):
    return json.loads((run_dir / "trainer_state.json").read_text())["log_history"]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow files that `load_dataset` caches inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_train_dpo_recipe_smoke(model_dir, tmp_path, capsys):
    run_dir = tmp_path / "dpo"
    recipe = RECIPES_DIR / "dpo-smollm2-cpu.yaml"

    code = main(
        ["train", str(recipe), "--model", str(model_dir), "--output_dir", str(run_dir), "--report_to", "none",
         "--max_length", "64", *SMOKE_OVERRIDES]
    )

    assert code == 0
    history = read_history(run_dir)
    assert [record["step"] for record in history] == [0, 1, 2]
    assert all(record["metrics"]["canopy/ce_star"] > 0 for record in history)
    steps = [entry for entry in read_log(run_dir) if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert all("rewards/margins" in entry for entry in steps)
    assert "reward:" not in capsys.readouterr().out


def test_train_grpo_recipe_smoke(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_dir = tmp_path / "grpo"
    recipe = RECIPES_DIR / "grpo-smollm2-cpu.yaml"

    code = main(
        ["train", str(recipe), "--model", str(model_dir), "--output_dir", str(run_dir),
         *SMOKE_OVERRIDES, *GENERATION_OVERRIDES]
    )

    assert code == 0
    history = read_history(run_dir)
    assert [record["step"] for record in history] == [0, 1, 2]
    # The monitor's prompts are held-out problems of the training set's source.
    assert all(len(record["prompts"]) == 2 for record in history)
    assert "Give only the final number." in json.dumps(history[0]["prompts"])

    rewards = [entry["reward"] for entry in read_log(run_dir) if "reward" in entry]
    assert len(rewards) == 2
    assert all(0.0 <= reward <= 1.0 for reward in rewards)
    output = capsys.readouterr().out
    assert "reward: " in output
    assert "at step 1 -> " in output

    # The trainer's own log keeps the monitor's scalars next to GRPO's metrics in W&B.
    run_files = list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert len(run_files) == 1
    rows = history_rows(run_files[0])
    assert [int(float(row["train/global_step"])) for row in rows if "train/canopy/ce_star" in row] == [0, 1, 2]
    assert any("train/reward" in row for row in rows)


def test_train_rloo_with_grpo_data(model_dir, tmp_path, capsys):
    run_dir = tmp_path / "rloo"
    recipe = RECIPES_DIR / "grpo-smollm2-cpu.yaml"

    code = main(
        ["train", str(recipe), "--trainer", "rloo", "--model", str(model_dir), "--output_dir", str(run_dir),
         "--report_to", "none", *SMOKE_OVERRIDES, *GENERATION_OVERRIDES]
    )

    assert code == 0
    assert [record["step"] for record in read_history(run_dir)] == [0, 1, 2]
    assert len([entry for entry in read_log(run_dir) if "reward" in entry]) == 2
    assert "reward: " in capsys.readouterr().out


def test_train_full_weights(model_dir, tmp_path):
    run_dir = tmp_path / "full"
    recipe = RECIPES_DIR / "sft-smollm2-cpu.yaml"

    code = main(
        ["train", str(recipe), "--model", str(model_dir), "--output_dir", str(run_dir), "--report_to", "none",
         "--peft", "null", "--max_length", "64", *SMOKE_OVERRIDES]
    )

    assert code == 0
    assert [record["step"] for record in read_history(run_dir)] == [0, 1, 2]
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["peft"] is None
    # All weights are saved, and load as a model of their own.
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir)
    assert reloaded.config.vocab_size == len(VOCAB_WORDS)


@pytest.mark.parametrize(
    ("recipe_name", "write_stand_in", "extra"),
    [
        ("sft-qwen2.5-0.5b-gpu.yaml", write_capybara, ["--max_length", "64"]),
        ("dpo-qwen2.5-0.5b-gpu.yaml", write_ultrafeedback, ["--max_length", "64"]),
        ("grpo-qwen2.5-0.5b-gpu.yaml", write_gsm8k, GENERATION_OVERRIDES),
    ],
)
def test_gpu_recipe_with_local_stand_ins(recipe_name, write_stand_in, extra, model_dir, tmp_path, datasets_cache):
    # The recipe's Hub model and data set are replaced by local folders in the same layout,
    # which the same `load_model_and_tokenizer` and `datasets.load_dataset` calls read.
    folder = write_stand_in(tmp_path / "hub-data")
    run_dir = tmp_path / "run"

    code = main(
        ["train", str(RECIPES_DIR / recipe_name), "--model", str(model_dir), "--hub", str(folder),
         "--output_dir", str(run_dir), "--report_to", "none", *SMOKE_OVERRIDES, *extra]
    )

    assert code == 0
    assert [record["step"] for record in read_history(run_dir)] == [0, 1, 2]
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["dataset"]["hub"] == str(folder)
    assert saved["peft"] is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--trainer", "dpo"], "trainer 'dpo' needs a preference data set"),
        (["--rewards", "exact_answer"], "rewards is set, but trainer 'sft' uses no reward functions"),
        (["--trainer", "grpo"], "'training.max_length' (not a trl.GRPOConfig field"),
        (["--peft", "lora"], "Invalid value for --peft"),
    ],
)
def test_train_trainer_mismatch_exits_before_loading(extra, expected, recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)

    code = main(["train", str(recipe), *extra])

    assert code == 2
    error = capsys.readouterr().err
    assert expected in error
    assert "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_train_help_names_trainers(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])

    output = capsys.readouterr().out
    assert "SFT, DPO, GRPO or RLOO" in output
    assert "--trainer dpo" in output
    assert "--peft null" in output
    assert "trl.SFTConfig" in output
    assert "DPOConfig, GRPOConfig or RLOOConfig" in output
