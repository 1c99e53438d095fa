"""Hub data sets, loaded through `datasets.load_dataset` from local folders in the Hub layout."""

import pytest

from canopy_monitor.hub_datasets import GSM8K_INSTRUCTION, gsm8k_final_answer, load_hub_dataset
from canopy_monitor.recipe import DatasetConfig, RecipeError
from canopy_monitor.training_data import build_training_dataset, load_training_data

from hub_stand_ins import gsm8k_rows, write_capybara, write_gsm8k, write_ultrafeedback


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow files that `load_dataset` caches inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def gsm8k_dir(tmp_path):
    return write_gsm8k(tmp_path / "gsm8k")


# GSM8K answers


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("3 + 4 = <<3+4=7>>7\n#### 7", "7"),
        ("Many steps.\n#### 1,200", "1200"),
        ("#### -3", "-3"),
        ("Half of 5 is 2.5\n####  2.5 ", "2.5"),
    ],
)
def test_gsm8k_final_answer(solution, expected):
    assert gsm8k_final_answer(solution) == expected


@pytest.mark.parametrize(("solution", "message"), [("The answer is 7", "no '####' mark"), ("#### seven", "Invalid")])
def test_gsm8k_final_answer_invalid(solution, message):
    with pytest.raises(ValueError, match=message):
        gsm8k_final_answer(solution)


# Loading


def test_gsm8k_folder_converted(gsm8k_dir):
    config = DatasetConfig(hub=str(gsm8k_dir), config_name="main", split="train", format="gsm8k")

    dataset = load_hub_dataset(config)

    expected = gsm8k_rows(12)
    assert len(dataset) == 12
    assert sorted(dataset.column_names) == ["answer", "prompt"]
    assert dataset[0]["answer"] == "2400"
    (turn,) = dataset[0]["prompt"]
    assert turn["role"] == "user"
    assert turn["content"] == f"{expected[0]['question']}\n{GSM8K_INSTRUCTION}"


def test_gsm8k_config_and_split_chosen(gsm8k_dir):
    socratic = load_hub_dataset(DatasetConfig(hub=str(gsm8k_dir), config_name="socratic", split="train"))
    test = load_hub_dataset(DatasetConfig(hub=str(gsm8k_dir), config_name="main", split="test"))

    assert len(socratic) == 3
    assert len(test) == 2
    assert socratic.column_names == ["question", "answer"]


def test_gsm8k_for_grpo_with_heldout(gsm8k_dir):
    config = DatasetConfig(hub=str(gsm8k_dir), config_name="main", format="gsm8k", num_examples=8, seed=1)

    data = load_training_data(config, trainer="grpo", rewards=["exact_answer"], num_heldout_prompts=4)

    train_questions = {prompt[0]["content"] for prompt in data.train_dataset["prompt"]}
    heldout_questions = {prompt[0]["content"] for prompt in data.heldout_prompts}
    assert len(data.train_dataset) == 8
    assert len(heldout_questions) == 4
    assert not train_questions & heldout_questions


def test_gsm8k_unconverted_lacks_prompt(gsm8k_dir):
    config = DatasetConfig(hub=str(gsm8k_dir), config_name="main")

    with pytest.raises(RecipeError, match="trainer 'grpo' needs a prompt-only data set.*`answer`, `question`"):
        build_training_dataset(config, trainer="grpo", rewards=["exact_answer"])


def test_ultrafeedback_implicit_prompt(tmp_path):
    folder = write_ultrafeedback(tmp_path / "ultrafeedback")
    config = DatasetConfig(hub=str(folder), num_examples=6, seed=0)

    data = load_training_data(config, trainer="dpo", num_heldout_prompts=3)

    assert len(data.train_dataset) == 6
    assert data.train_dataset.column_names == ["chosen", "rejected", "score_chosen", "score_rejected"]
    for prompt in data.heldout_prompts:
        (turn,) = prompt
        assert turn["role"] == "user"
        assert turn["content"].startswith("what is w")


def test_capybara_for_sft(tmp_path):
    folder = write_capybara(tmp_path / "capybara")

    data = load_training_data(DatasetConfig(hub=str(folder), num_examples=5), trainer="sft", num_heldout_prompts=2)

    assert len(data.train_dataset) == 5
    assert "messages" in data.train_dataset.column_names
    # A multi-turn conversation is cut before its last assistant turn.
    assert [turn["content"] for turn in data.heldout_prompts[0]][-1] == "and then ?"


def test_capybara_wrong_trainer_raises(tmp_path):
    folder = write_capybara(tmp_path / "capybara")

    with pytest.raises(RecipeError, match=r"trainer 'dpo' needs a preference data set.*dataset.hub"):
        build_training_dataset(DatasetConfig(hub=str(folder)), trainer="dpo")


# Load errors


def test_missing_folder_raises(tmp_path):
    config = DatasetConfig(hub=str(tmp_path / "absent"))

    with pytest.raises(RecipeError, match="Failed to load dataset.hub"):
        load_hub_dataset(config)


def test_unknown_split_raises(gsm8k_dir):
    config = DatasetConfig(hub=str(gsm8k_dir), config_name="main", split="validation")

    with pytest.raises(RecipeError, match="Failed to load dataset.hub.*split 'validation'"):
        load_hub_dataset(config)


def test_unknown_config_raises(gsm8k_dir):
    config = DatasetConfig(hub=str(gsm8k_dir), config_name="mian")

    with pytest.raises(RecipeError, match="Failed to load dataset.hub.*config_name 'mian'"):
        load_hub_dataset(config)


def test_unknown_format_raises(gsm8k_dir):
    config = DatasetConfig(hub=str(gsm8k_dir), config_name="main", format="math")

    with pytest.raises(RecipeError, match="Unknown dataset.format 'math'. Available: gsm8k"):
        load_hub_dataset(config)


def test_format_missing_columns_raises(tmp_path):
    folder = write_capybara(tmp_path / "capybara")

    with pytest.raises(RecipeError, match="dataset.format 'gsm8k' reads the columns question, answer.*lacks question"):
        load_hub_dataset(DatasetConfig(hub=str(folder), format="gsm8k"))


def test_format_bad_row_names_index(tmp_path):
    from hub_stand_ins import write_hub_folder

    rows = gsm8k_rows(3)
    rows[2]["answer"] = "No final mark here."
    folder = write_hub_folder(tmp_path / "broken", {"main": {"train": rows}})

    with pytest.raises(RecipeError, match="Row 2 of dataset.hub.*does not fit dataset.format 'gsm8k'.*'####' mark"):
        load_hub_dataset(DatasetConfig(hub=str(folder), config_name="main", format="gsm8k"))
