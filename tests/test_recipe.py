from pathlib import Path

import pytest

from canopy_monitor.recipe import (
    DatasetConfig,
    LoraSettings,
    MonitorConfig,
    RecipeError,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
)

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

RECIPE_TEXT = """\
model: smollm2-135m-instruct
dataset: {name: python-docstrings, num_examples: 100, seed: 1}
peft: {r: 8, lora_alpha: 16, lora_dropout: 0.1, target_modules: [q_proj, v_proj]}
monitor: {prompts: heldout, num_prompts: 6, every_n_steps: 10, num_rollouts: 4, max_new_tokens: 32, seed: 5}
training:
  output_dir: runs/test
  max_steps: 20
  learning_rate: 1.0e-4
  report_to: [wandb]
  bf16: false
"""


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE_TEXT)
    return path


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


# Loading


def test_load_sections_typed(recipe_file):
    recipe = load_recipe(recipe_file)

    assert recipe.model == "smollm2-135m-instruct"
    assert recipe.dataset == DatasetConfig(name="python-docstrings", num_examples=100, seed=1)
    assert recipe.peft == LoraSettings(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    assert recipe.monitor.num_prompts == 6
    assert recipe.monitor.every_n_steps == 10
    assert recipe.monitor.num_rollouts == 4
    assert recipe.monitor.max_new_tokens == 32
    assert recipe.monitor.seed == 5
    assert recipe.monitor.temperature == 1.0
    assert recipe.training == {
        "output_dir": "runs/test",
        "max_steps": 20,
        "learning_rate": 1e-4,
        "report_to": ["wandb"],
        "bf16": False,
    }
    assert recipe.source == recipe_file


def test_load_missing_sections_default(tmp_path):
    recipe = load_recipe(write(tmp_path, "model: some/dir\n"))

    assert recipe.dataset == DatasetConfig()
    assert recipe.peft == LoraSettings()
    assert recipe.monitor == MonitorConfig()
    assert recipe.training == {}


def test_load_int_accepted_for_float(tmp_path):
    recipe = load_recipe(write(tmp_path, "model: m\nmonitor: {temperature: 1}\ntraining: {learning_rate: 1}\n"))

    assert recipe.monitor.temperature == 1.0
    assert isinstance(recipe.monitor.temperature, float)
    assert recipe.training["learning_rate"] == 1.0
    assert isinstance(recipe.training["learning_rate"], float)


def test_to_dict_round_trip(recipe_file):
    recipe = load_recipe(recipe_file)

    rebuilt = recipe_from_dict(recipe.to_dict())

    assert rebuilt.source is None
    rebuilt.source = recipe.source
    assert rebuilt == recipe


def test_bundled_recipe_loads():
    recipe = load_recipe(RECIPES_DIR / "sft-smollm2-cpu.yaml")

    assert recipe.model == "smollm2-135m-instruct"
    assert recipe.monitor.prompts == "heldout"
    assert recipe.training["output_dir"] == "runs/sft-smollm2-cpu"
    assert recipe.training["report_to"] == ["wandb"]
    assert recipe.training["max_steps"] > 0


# Load errors


def test_missing_file_raises(tmp_path):
    with pytest.raises(RecipeError, match="not found.*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_invalid_yaml_raises(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "model: [unclosed\n"))


def test_top_level_not_mapping_raises(tmp_path):
    with pytest.raises(RecipeError, match="must contain a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_missing_model_raises(tmp_path):
    with pytest.raises(RecipeError, match="must name a model"):
        load_recipe(write(tmp_path, "training: {max_steps: 1}\n"))


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(RecipeError, match="Unknown recipe section 'monitr'.*Did you mean monitor"):
        load_recipe(write(tmp_path, "model: m\nmonitr: {seed: 1}\n"))


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(RecipeError, match=r"Unknown key 'monitor.num_rollout'.*num_rollouts"):
        load_recipe(write(tmp_path, "model: m\nmonitor: {num_rollout: 4}\n"))


def test_unknown_training_key_suggests(tmp_path):
    with pytest.raises(RecipeError, match=r"training.max_step.*not a trl.SFTConfig field.*max_steps"):
        load_recipe(write(tmp_path, "model: m\ntraining: {max_step: 4}\n"))


def test_section_not_mapping_raises(tmp_path):
    with pytest.raises(RecipeError, match="'peft' must be a mapping"):
        load_recipe(write(tmp_path, "model: m\npeft: 16\n"))


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("model: 3\n", "model must be str"),
        ("model: m\nmonitor: {num_rollouts: eight}\n", "monitor.num_rollouts must be int"),
        ("model: m\nmonitor: {num_rollouts: 8.5}\n", "monitor.num_rollouts must be int"),
        ("model: m\nmonitor: {use_chat_template: 'yes'}\n", "monitor.use_chat_template must be bool"),
        ("model: m\nmonitor: {every_n_steps: true}\n", "monitor.every_n_steps must be int"),
        ("model: m\npeft: {target_modules: q_proj}\n", "peft.target_modules must be list"),
        ("model: m\npeft: {target_modules: [1, 2]}\n", "peft.target_modules must be list"),
        ("model: m\ntraining: {max_steps: ten}\n", "training.max_steps must be int"),
        ("model: m\ntraining: {bf16: 1}\n", "training.bf16 must be bool"),
        ("model: m\ntraining: {report_to: 5}\n", "training.report_to must be"),
    ],
)
def test_wrong_type_raises(tmp_path, text, label):
    with pytest.raises(RecipeError, match=label):
        load_recipe(write(tmp_path, text))


def test_invalid_value_raises(tmp_path):
    with pytest.raises(RecipeError, match="num_examples must be a positive integer"):
        load_recipe(write(tmp_path, "model: m\ndataset: {num_examples: 0}\n"))
    with pytest.raises(RecipeError, match="lora_dropout"):
        load_recipe(write(tmp_path, "model: m\npeft: {lora_dropout: 1.5}\n"))
    with pytest.raises(RecipeError, match="monitor.every_n_steps must be a positive integer"):
        load_recipe(write(tmp_path, "model: m\nmonitor: {every_n_steps: 0}\n"))
    with pytest.raises(RecipeError, match="monitor.num_prompts must be a positive integer"):
        load_recipe(write(tmp_path, "model: m\nmonitor: {num_prompts: -1}\n"))
    with pytest.raises(RecipeError, match="monitor.batch_size must be a positive integer, or null"):
        load_recipe(write(tmp_path, "model: m\nmonitor: {batch_size: 0}\n"))


def test_batch_size_null_means_from_memory(tmp_path):
    assert load_recipe(write(tmp_path, "model: m\nmonitor: {batch_size: null}\n")).monitor.batch_size is None
    assert load_recipe(write(tmp_path, "model: m\nmonitor: {batch_size: 16}\n")).monitor.batch_size == 16


def test_monitor_alert_and_record_settings(tmp_path):
    text = "model: m\nmonitor: {alert_ce_star_change: 10, alert_rho_change: 0.3, rollout_record_points: 0}\n"
    monitor = load_recipe(write(tmp_path, text)).monitor

    assert monitor.alert_ce_star_change == 10.0
    assert monitor.alert_rho_change == 0.3
    assert monitor.rollout_record_points == 0
    assert load_recipe(write(tmp_path, "model: m\n")).monitor.alert_ce_star_change is None


def test_monitor_alert_and_record_settings_checked(tmp_path):
    with pytest.raises(RecipeError, match="monitor.alert_ce_star_change must be a positive number"):
        load_recipe(write(tmp_path, "model: m\nmonitor: {alert_ce_star_change: 0}\n"))
    with pytest.raises(RecipeError, match="monitor.rollout_record_points must be 0"):
        load_recipe(write(tmp_path, "model: m\nmonitor: {rollout_record_points: 1}\n"))


def test_recipe_error_is_value_error():
    assert issubclass(RecipeError, ValueError)


# Overrides


def test_override_bare_names(recipe_file):
    recipe = load_recipe(
        recipe_file, ["--max_steps", "4", "--output_dir", "runs/x", "--num_rollouts", "6", "--model", "path/to/dir"]
    )

    assert recipe.training["max_steps"] == 4
    assert recipe.training["output_dir"] == "runs/x"
    assert recipe.monitor.num_rollouts == 6
    assert recipe.model == "path/to/dir"


def test_override_dotted_name(recipe_file):
    recipe = load_recipe(recipe_file, ["--monitor.seed", "3", "--dataset.seed", "9", "--training.seed", "11"])

    assert recipe.monitor.seed == 3
    assert recipe.dataset.seed == 9
    assert recipe.training["seed"] == 11


def test_override_equals_form(recipe_file):
    recipe = load_recipe(recipe_file, ["--max_steps=7", "--monitor.temperature=0.7"])

    assert recipe.training["max_steps"] == 7
    assert recipe.monitor.temperature == 0.7


def test_override_dashes_as_underscores(recipe_file):
    recipe = load_recipe(recipe_file, ["--max-steps", "5", "--monitor.num-rollouts", "3"])

    assert recipe.training["max_steps"] == 5
    assert recipe.monitor.num_rollouts == 3


def test_override_bare_flag_sets_true(recipe_file):
    recipe = load_recipe(recipe_file, ["--use_cpu", "--strict", "--max_steps", "2"])

    assert recipe.training["use_cpu"] is True
    assert recipe.monitor.strict is True
    assert recipe.training["max_steps"] == 2


def test_override_bare_flag_last(recipe_file):
    recipe = load_recipe(recipe_file, ["--use_cpu"])

    assert recipe.training["use_cpu"] is True


@pytest.mark.parametrize(("text", "expected"), [("false", False), ("no", False), ("0", False), ("True", True)])
def test_override_bool_values(recipe_file, text, expected):
    recipe = load_recipe(recipe_file, ["--use_chat_template", text])

    assert recipe.monitor.use_chat_template is expected


def test_override_float_and_negative(recipe_file):
    recipe = load_recipe(recipe_file, ["--learning_rate", "3e-5", "--max_grad_norm", "-1"])

    assert recipe.training["learning_rate"] == 3e-5
    assert recipe.training["max_grad_norm"] == -1.0


def test_override_list_comma_separated(recipe_file):
    recipe = load_recipe(recipe_file, ["--target_modules", "q_proj,k_proj, v_proj"])

    assert recipe.peft.target_modules == ["q_proj", "k_proj", "v_proj"]


def test_override_str_or_list_field(recipe_file):
    single = load_recipe(recipe_file, ["--report_to", "wandb"])
    several = load_recipe(recipe_file, ["--report_to", "wandb,tensorboard"])
    none = load_recipe(recipe_file, ["--report_to", "none"])

    assert single.training["report_to"] == "wandb"
    assert several.training["report_to"] == ["wandb", "tensorboard"]
    assert none.training["report_to"] == "none"


def test_override_null_clears_optional(recipe_file):
    recipe = load_recipe(recipe_file, ["--num_examples", "null", "--num_prompts", "none", "--target_modules", "null"])

    assert recipe.dataset.num_examples is None
    assert recipe.monitor.num_prompts is None
    assert recipe.peft.target_modules is None


def test_override_dict_field(recipe_file):
    recipe = load_recipe(recipe_file, ["--lr_scheduler_kwargs", "{min_lr: 0.0001}"])

    assert recipe.training["lr_scheduler_kwargs"] == {"min_lr": 0.0001}


def test_override_section_absent_from_file(tmp_path):
    recipe = load_recipe(write(tmp_path, "model: m\n"), ["--r", "4", "--dataset.path", "data.jsonl"])

    assert recipe.peft.r == 4
    assert recipe.dataset.path == "data.jsonl"


def test_override_missing_model_supplied(tmp_path):
    recipe = load_recipe(write(tmp_path, "training: {max_steps: 1}\n"), ["--model", "a/b"])

    assert recipe.model == "a/b"


def test_apply_overrides_leaves_input_unchanged():
    raw = {"model": "m", "training": {"max_steps": 1}}

    result = apply_overrides(raw, ["--max_steps", "2"])

    assert result["training"]["max_steps"] == 2
    assert raw["training"]["max_steps"] == 1


# Override errors


def test_override_unknown_suggests(recipe_file):
    with pytest.raises(RecipeError, match=r"Unknown override --max_step\b.*--max_steps"):
        load_recipe(recipe_file, ["--max_step", "4"])


def test_override_unknown_without_match(recipe_file):
    with pytest.raises(RecipeError, match=r"Unknown override --zzzzzz\.$"):
        load_recipe(recipe_file, ["--zzzzzz", "1"])


def test_override_ambiguous_lists_candidates(recipe_file):
    with pytest.raises(RecipeError, match="--seed is ambiguous.*--dataset.seed, --monitor.seed, --training.seed"):
        load_recipe(recipe_file, ["--seed", "3"])


def test_override_bad_int_raises(recipe_file):
    with pytest.raises(RecipeError, match="Invalid value for --max_steps: 'four' is not int"):
        load_recipe(recipe_file, ["--max_steps", "four"])


def test_override_bad_bool_raises(recipe_file):
    with pytest.raises(RecipeError, match="Invalid value for --strict: 'maybe'"):
        load_recipe(recipe_file, ["--strict", "maybe"])


def test_override_missing_value_raises(recipe_file):
    with pytest.raises(RecipeError, match="--max_steps needs a value"):
        load_recipe(recipe_file, ["--max_steps"])
    with pytest.raises(RecipeError, match="--output_dir needs a value"):
        load_recipe(recipe_file, ["--output_dir", "--max_steps", "3"])


def test_override_positional_raises(recipe_file):
    with pytest.raises(RecipeError, match="Unexpected argument 'extra'"):
        load_recipe(recipe_file, ["extra"])
    with pytest.raises(RecipeError, match="Unexpected argument '-x'"):
        load_recipe(recipe_file, ["-x", "1"])


def test_override_value_checked_after_conversion(recipe_file):
    with pytest.raises(RecipeError, match="num_examples must be a positive integer"):
        load_recipe(recipe_file, ["--num_examples", "-3"])


def test_override_estimation_settings():
    recipe = load_recipe(RECIPES_DIR / "sft-smollm2-cpu.yaml", ["--monitor.units", "bits", "--running_positions", "16,32", "--bootstrap_samples", "0"])

    assert recipe.monitor.units == "bits"
    assert recipe.monitor.running_positions == [16, 32]
    assert recipe.monitor.bootstrap_samples == 0


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--units", "shannons"], "--units"),
        (["--confidence", "2"], "monitor.confidence"),
        (["--bootstrap_samples", "1"], "monitor.bootstrap_samples"),
        (["--truncation_warning", "1.5"], "monitor.truncation_warning"),
        (["--running_positions", "16,500"], "monitor.running_positions"),
    ],
)
def test_invalid_estimation_setting_raises(override, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(RECIPES_DIR / "sft-smollm2-cpu.yaml", override)


# Trainers


def test_trainer_defaults_to_sft(recipe_file):
    recipe = load_recipe(recipe_file)

    assert recipe.trainer == "sft"
    assert recipe.rewards == []


@pytest.mark.parametrize(
    ("trainer", "dataset", "extra", "config_key"),
    [
        ("dpo", "python-docstrings-preferences", "", "beta: 0.2"),
        ("grpo", "arithmetic-word-problems", "rewards: [exact_answer]\n", "num_generations: 4"),
        ("rloo", "arithmetic-word-problems", "rewards: [exact_answer]\n", "num_generations: 4"),
    ],
)
def test_trainer_training_checked_against_its_config(tmp_path, trainer, dataset, extra, config_key):
    text = f"model: m\ntrainer: {trainer}\n{extra}dataset: {{name: {dataset}}}\ntraining: {{{config_key}}}\n"

    recipe = load_recipe(write(tmp_path, text))

    key, value = config_key.split(": ")
    assert recipe.trainer == trainer
    assert recipe.training[key] == float(value) if "." in value else int(value)


def test_trainer_field_of_other_config_raises(tmp_path):
    with pytest.raises(RecipeError, match=r"training.beta' \(not a trl.SFTConfig field, which trainer 'sft' uses\)"):
        load_recipe(write(tmp_path, "model: m\ntraining: {beta: 0.1}\n"))
    with pytest.raises(RecipeError, match=r"training.num_generations' \(not a trl.DPOConfig field"):
        load_recipe(
            write(tmp_path, "model: m\ntrainer: dpo\ndataset: {name: python-docstrings-preferences}\ntraining: {num_generations: 4}\n")
        )


def test_trainer_invalid_raises(tmp_path):
    with pytest.raises(RecipeError, match="trainer must be 'sft' or 'dpo' or 'grpo' or 'rloo', got 'ppo'"):
        load_recipe(write(tmp_path, "model: m\ntrainer: ppo\n"))


def test_dpo_with_sft_data_raises(tmp_path):
    text = "model: m\ntrainer: dpo\ndataset: {name: python-docstrings}\n"

    with pytest.raises(RecipeError, match="trainer 'dpo' needs a preference data set.*dataset.name 'python-docstrings'"):
        load_recipe(write(tmp_path, text))


def test_grpo_with_preference_data_raises(tmp_path):
    text = "model: m\ntrainer: grpo\nrewards: [exact_answer]\ndataset: {name: python-docstrings-preferences}\n"

    with pytest.raises(RecipeError, match="'exact_answer' reads the column\\(s\\) `answer`.*python-docstrings-preferences"):
        load_recipe(write(tmp_path, text))


def test_sft_with_arithmetic_data_raises(tmp_path):
    text = "model: m\ndataset: {name: arithmetic-word-problems}\n"

    with pytest.raises(RecipeError, match="trainer 'sft' needs a language modeling data set.*python-docstrings\\.$"):
        load_recipe(write(tmp_path, text))


def test_unknown_dataset_name_raises(tmp_path):
    with pytest.raises(RecipeError, match="Unknown dataset.name 'wiki'. Built-in data sets: arithmetic-word-problems"):
        load_recipe(write(tmp_path, "model: m\ndataset: {name: wiki}\n"))


def test_file_and_hub_data_checked_later(tmp_path):
    recipe = load_recipe(write(tmp_path, "model: m\ntrainer: dpo\ndataset: {hub: some/preferences}\n"))

    assert recipe.dataset.hub == "some/preferences"
    assert recipe.dataset.split == "train"


# Rewards


def test_rewards_loaded_for_grpo(tmp_path):
    text = "model: m\ntrainer: grpo\nrewards: [exact_answer]\ndataset: {name: arithmetic-word-problems}\n"

    recipe = load_recipe(write(tmp_path, text))

    assert recipe.rewards == ["exact_answer"]


def test_rewards_missing_for_grpo_raises(tmp_path):
    with pytest.raises(RecipeError, match="trainer 'grpo' needs reward functions: set `rewards`.*Available: exact_answer"):
        load_recipe(write(tmp_path, "model: m\ntrainer: grpo\ndataset: {name: arithmetic-word-problems}\n"))


def test_rewards_unknown_suggests(tmp_path):
    text = "model: m\ntrainer: rloo\nrewards: [exact_answers]\ndataset: {name: arithmetic-word-problems}\n"

    with pytest.raises(RecipeError, match="Unknown reward function 'exact_answers' in rewards. Did you mean exact_answer"):
        load_recipe(write(tmp_path, text))


def test_rewards_with_sft_raises(tmp_path):
    with pytest.raises(RecipeError, match="rewards is set, but trainer 'sft' uses no reward functions"):
        load_recipe(write(tmp_path, "model: m\nrewards: [exact_answer]\n"))


def test_rewards_wrong_type_raises(tmp_path):
    with pytest.raises(RecipeError, match="rewards must be list"):
        load_recipe(write(tmp_path, "model: m\ntrainer: grpo\nrewards: exact_answer\n"))


# Full fine-tuning and data set sources


def test_peft_null_trains_all_weights(tmp_path):
    recipe = load_recipe(write(tmp_path, "model: m\npeft: null\n"))

    assert recipe.peft is None
    assert recipe.to_dict()["peft"] is None
    assert recipe_from_dict(recipe.to_dict()).peft is None


def test_peft_missing_keeps_lora(tmp_path):
    assert load_recipe(write(tmp_path, "model: m\n")).peft == LoraSettings()


def test_override_peft_null(recipe_file):
    recipe = load_recipe(recipe_file, ["--peft", "null"])

    assert recipe.peft is None


def test_override_peft_non_null_raises(recipe_file):
    with pytest.raises(RecipeError, match="Invalid value for --peft: 'lora' is not null"):
        load_recipe(recipe_file, ["--peft", "lora"])


def test_override_trainer_selects_config(recipe_file):
    recipe = load_recipe(
        recipe_file, ["--trainer", "dpo", "--name", "python-docstrings-preferences", "--beta", "0.3", "--max_steps", "2"]
    )

    assert recipe.trainer == "dpo"
    assert recipe.training["beta"] == 0.3
    assert recipe.training["max_steps"] == 2


def test_override_config_field_of_other_trainer_raises(recipe_file):
    with pytest.raises(RecipeError, match="Unknown override --num_generations"):
        load_recipe(recipe_file, ["--num_generations", "4"])


def test_override_invalid_trainer_raises(recipe_file):
    with pytest.raises(RecipeError, match="Invalid value for --trainer: 'ppo' is not 'sft' or 'dpo' or 'grpo' or 'rloo'"):
        load_recipe(recipe_file, ["--trainer=ppo"])


def test_override_rewards_list(tmp_path):
    path = write(tmp_path, "model: m\ntrainer: grpo\nrewards: [nope]\ndataset: {name: arithmetic-word-problems}\n")

    recipe = load_recipe(path, ["--rewards", "exact_answer"])

    assert recipe.rewards == ["exact_answer"]


def test_dataset_hub_fields(tmp_path):
    text = "model: m\ndataset: {hub: openai/gsm8k, config_name: main, split: test, format: gsm8k}\n"

    dataset = load_recipe(write(tmp_path, text)).dataset

    assert (dataset.hub, dataset.config_name, dataset.split, dataset.format) == ("openai/gsm8k", "main", "test", "gsm8k")
    assert dataset.source_label() == "dataset.hub 'openai/gsm8k'"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{path: a.jsonl, hub: b/c}", "dataset.path and dataset.hub are both set"),
        ("{config_name: main}", "dataset.config_name applies to a dataset.hub data set"),
        ("{path: a.jsonl, format: gsm8k}", "dataset.format applies to a dataset.hub data set"),
    ],
)
def test_dataset_source_conflicts_raise(tmp_path, section, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, f"model: m\ndataset: {section}\n"))


# Held-out prompts from the training source


def test_monitor_prompts_dataset_accepted(tmp_path):
    text = "model: m\ndataset: {num_examples: 100}\nmonitor: {prompts: dataset, num_prompts: 4}\n"

    assert load_recipe(write(tmp_path, text)).monitor.prompts == "dataset"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dataset: {num_examples: 100}\nmonitor: {prompts: dataset}\n", "needs monitor.num_prompts"),
        ("monitor: {prompts: dataset, num_prompts: 4}\n", "needs dataset.num_examples"),
    ],
)
def test_monitor_prompts_dataset_incomplete_raises(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, "model: m\n" + text))


# Every shipped recipe


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_recipe_validates(path):
    from canopy_monitor.recipe import trainer_config_class

    recipe = load_recipe(path)

    assert recipe.training["output_dir"] == f"runs/{path.stem}"
    assert recipe.training["run_name"] == path.stem
    assert recipe.training["report_to"] == ["wandb"]
    assert recipe.trainer in path.stem.split("-")[0]
    # The config class runs its own checks, such as GRPO's batch divisible by num_generations.
    # GPU recipes set bf16, which the config accepts on a machine without a GPU only with use_cpu.
    config = trainer_config_class(recipe.trainer)(**{**recipe.training, "use_cpu": True})
    assert config.max_steps > 0


def test_shipped_recipes_cover_trainers():
    trainers = {load_recipe(path).trainer for path in RECIPES_DIR.glob("*.yaml")}

    assert {"sft", "dpo", "grpo"} <= trainers
