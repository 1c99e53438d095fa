"""Data sets for the DPO, GRPO and RLOO trainers, and their fit to each trainer."""

import json
from collections import Counter

import pytest

from canopy_monitor.arithmetic_problems import ANSWER_INSTRUCTION, TEMPLATES, build_arithmetic_problems
from canopy_monitor.data_formats import check_trainer_columns, row_prompt
from canopy_monitor.recipe import DatasetConfig, RecipeError
from canopy_monitor.rewards import exact_answer
from canopy_monitor.training_data import (
    BUILTIN_DATASETS,
    build_python_docstring_examples,
    build_python_docstring_preferences,
    build_training_dataset,
    check_builtin_dataset,
    load_training_data,
    read_jsonl_examples,
)


@pytest.fixture(scope="module")
def preferences():
    return build_python_docstring_preferences(seed=0)


def content(turns):
    (turn,) = turns
    return turn["content"]


# DPO preference set


def test_preferences_well_formed(preferences):
    for row in preferences:
        assert list(row) == ["prompt", "chosen", "rejected"]
        assert row["prompt"][0]["role"] == "user"
        assert row["chosen"][0]["role"] == "assistant"
        assert row["rejected"][0]["role"] == "assistant"
        assert content(row["chosen"]) != content(row["rejected"])


def test_preferences_chosen_is_sft_answer(preferences):
    sft = build_python_docstring_examples(seed=0)
    sft_answers = {row["messages"][0]["content"]: row["messages"][1]["content"] for row in sft}

    # Questions without a random wording are shared word for word with the SFT set.
    call = "How do I call `textwrap.dedent`?"
    row = next(row for row in preferences if row["prompt"][0]["content"] == call)

    assert content(row["chosen"]) == sft_answers[call]
    assert len(preferences) == len(sft)


def test_preferences_rejected_kinds(preferences):
    rejected_longer = 0
    wrong_summary = 0
    for row in preferences:
        question = row["prompt"][0]["content"]
        chosen, rejected = content(row["chosen"]), content(row["rejected"])
        if question.startswith("How do I call") or question.startswith("Which Python module"):
            # The same sentence with one wrong part.
            assert chosen.split(". ", 1)[1] == rejected.split(". ", 1)[1]
        elif rejected.startswith(chosen):
            rejected_longer += 1
        else:
            wrong_summary += 1

    # About half of the "what does it do" rows ramble and half are wrong.
    assert rejected_longer > 500
    assert wrong_summary > 500
    assert 0.8 < rejected_longer / wrong_summary < 1.25


def test_preferences_wrong_module_named(preferences):
    question = "Which Python module provides `namedtuple`?"
    row = next(row for row in preferences if row["prompt"][0]["content"] == question)

    assert "`collections` module" in content(row["chosen"])
    assert "`collections` module" not in content(row["rejected"])
    assert " module. " in content(row["rejected"])


def test_preferences_deterministic_for_seed(preferences):
    again = build_python_docstring_preferences(seed=0)
    other = build_python_docstring_preferences(seed=1)

    assert again == preferences
    assert other != preferences


# GRPO arithmetic set


def test_arithmetic_rows_well_formed():
    rows = build_arithmetic_problems(seed=0)

    assert len(rows) == 540
    for row in rows:
        assert list(row) == ["prompt", "answer"]
        (turn,) = row["prompt"]
        assert turn["role"] == "user"
        assert turn["content"].endswith(ANSWER_INSTRUCTION)
        assert int(row["answer"]) > 0


def test_arithmetic_answers_correct():
    rows = build_arithmetic_problems(seed=0)

    first = rows[0]["prompt"][0]["content"]
    assert "has 2 apples and buys 1 more" in first
    assert rows[0]["answer"] == "3"
    last = rows[-1]["prompt"][0]["content"]
    assert "picked 9 flowers and 8 of them wilted" in last
    assert rows[-1]["answer"] == "1"
    assert Counter(template.operation for template in TEMPLATES) == {"+": 5, "-": 5}


def test_arithmetic_questions_unique():
    questions = [row["prompt"][0]["content"] for row in build_arithmetic_problems(seed=3)]

    assert len(set(questions)) == len(questions)


def test_arithmetic_deterministic_for_seed():
    assert build_arithmetic_problems(seed=5) == build_arithmetic_problems(seed=5)
    assert build_arithmetic_problems(seed=5) != build_arithmetic_problems(seed=6)


def test_arithmetic_answer_rewarded():
    rows = build_arithmetic_problems(seed=0)[:4]
    completions = [[{"role": "assistant", "content": f"So the answer is {row['answer']}."}] for row in rows]
    wrong = [[{"role": "assistant", "content": f"{int(row['answer']) + 1}"}] for row in rows]
    answers = [row["answer"] for row in rows]

    assert exact_answer(completions, answer=answers) == [1.0] * 4
    assert exact_answer(wrong, answer=answers) == [0.0] * 4


# Loading for a trainer


def test_load_heldout_prompts_disjoint():
    config = DatasetConfig(name="arithmetic-word-problems", num_examples=100, seed=2)

    data = load_training_data(config, trainer="grpo", rewards=["exact_answer"], num_heldout_prompts=8)

    train_prompts = {row[0]["content"] for row in data.train_dataset["prompt"]}
    heldout = [prompt[0]["content"] for prompt in data.heldout_prompts]
    assert len(data.train_dataset) == 100
    assert len(heldout) == 8
    assert not train_prompts.intersection(heldout)
    assert data.train_dataset.column_names == ["prompt", "answer"]


def test_load_heldout_same_training_rows():
    config = DatasetConfig(name="arithmetic-word-problems", num_examples=50, seed=1)

    with_prompts = load_training_data(config, num_heldout_prompts=5)
    without = load_training_data(config)

    assert with_prompts.train_dataset["prompt"] == without.train_dataset["prompt"]
    assert without.heldout_prompts == []


def test_load_heldout_too_many_raises():
    config = DatasetConfig(name="arithmetic-word-problems", num_examples=535)

    with pytest.raises(RecipeError, match="takes 8 held-out prompts from the rest.*only 540 examples"):
        load_training_data(config, num_heldout_prompts=8)


def test_load_checks_trainer_columns():
    config = DatasetConfig(name="python-docstrings", num_examples=10)

    with pytest.raises(RecipeError, match="trainer 'dpo' needs a preference data set.*dataset.name 'python-docstrings'"):
        build_training_dataset(config, trainer="dpo")


def test_load_preferences_for_dpo():
    config = DatasetConfig(name="python-docstrings-preferences", num_examples=20, seed=4)

    dataset = build_training_dataset(config, trainer="dpo")

    assert len(dataset) == 20
    assert dataset.column_names == ["prompt", "chosen", "rejected"]


@pytest.mark.parametrize(
    ("name", "trainer", "fits"),
    [
        ("python-docstrings", "sft", True),
        ("python-docstrings", "dpo", False),
        ("python-docstrings", "grpo", False),
        ("python-docstrings-preferences", "dpo", True),
        ("python-docstrings-preferences", "sft", False),
        ("arithmetic-word-problems", "grpo", True),
        ("arithmetic-word-problems", "rloo", True),
        ("arithmetic-word-problems", "dpo", False),
    ],
)
def test_builtin_fit_per_trainer(name, trainer, fits):
    rewards = ["exact_answer"] if trainer in ("grpo", "rloo") else []
    if fits:
        check_builtin_dataset(name, trainer, rewards)
    else:
        with pytest.raises(RecipeError, match=f"trainer {trainer!r} needs"):
            check_builtin_dataset(name, trainer, rewards)


def test_builtin_mismatch_suggests_fitting_set():
    with pytest.raises(RecipeError, match="Built-in data sets for trainer 'dpo': python-docstrings-preferences"):
        check_builtin_dataset("python-docstrings", "dpo")


def test_builtin_unknown_raises():
    with pytest.raises(RecipeError, match="Unknown dataset.name 'gsm8k'.*arithmetic-word-problems"):
        check_builtin_dataset("gsm8k", "grpo", ["exact_answer"])


def test_builtin_columns_match_rows():
    for name, builtin in BUILTIN_DATASETS.items():
        if name == "arithmetic-word-problems":
            rows = builtin.build(0)
        else:
            rows = builtin.build(0)[:5]
        assert tuple(rows[0]) == builtin.columns


def test_reward_column_missing_raises():
    with pytest.raises(RecipeError, match="'exact_answer' reads the column\\(s\\) `answer`.*has the columns `prompt`"):
        check_trainer_columns("grpo", ["prompt"], "dataset.path 'x.jsonl'", ["exact_answer"])


# Prompts of rows


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "The sky is", "completion": " blue."}, "The sky is"),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            [{"role": "user", "content": "Hi"}],
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "A"},
                    {"role": "assistant", "content": "B"},
                    {"role": "user", "content": "C"},
                    {"role": "assistant", "content": "D"},
                ]
            },
            [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}],
        ),
        (
            {
                "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
            },
            [{"role": "user", "content": "Q"}],
        ),
    ],
)
def test_row_prompt_per_type(row, expected):
    assert row_prompt(row) == expected


@pytest.mark.parametrize(
    "row",
    [{"text": "plain text"}, {"messages": [{"role": "user", "content": "Only a question"}]}],
)
def test_row_prompt_missing_raises(row):
    with pytest.raises(ValueError, match="prompt"):
        row_prompt(row)


# User files for the other trainers


def write_jsonl(tmp_path, records):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


def test_user_file_preferences(tmp_path):
    records = [{"prompt": f"Q{i}", "chosen": "good", "rejected": "bad", "score": 1} for i in range(6)]
    path = write_jsonl(tmp_path, records)

    dataset = build_training_dataset(DatasetConfig(path=str(path)), trainer="dpo")

    assert len(dataset) == 6
    assert dataset.column_names == ["prompt", "chosen", "rejected"]


def test_user_file_prompt_only_keeps_columns(tmp_path):
    records = [{"prompt": [{"role": "user", "content": f"{i} + 1?"}], "answer": str(i + 1)} for i in range(5)]
    path = write_jsonl(tmp_path, records)

    dataset = build_training_dataset(DatasetConfig(path=str(path)), trainer="grpo", rewards=["exact_answer"])

    assert sorted(dataset.column_names) == ["answer", "prompt"]
    assert sorted(dataset["answer"]) == ["1", "2", "3", "4", "5"]


def test_user_file_bad_answer_raises(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "1 + 1?", "answer": "2"}, {"prompt": "2 + 2?", "answer": "four"}])

    with pytest.raises(RecipeError, match="column `answer`: Invalid reference answer 'four'"):
        build_training_dataset(DatasetConfig(path=str(path)), trainer="grpo", rewards=["exact_answer"])


def test_user_file_wrong_type_for_trainer(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "Q", "completion": "A"}])

    with pytest.raises(RecipeError, match="trainer 'dpo' needs a preference data set.*dataset.path"):
        build_training_dataset(DatasetConfig(path=str(path)), trainer="dpo")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"chosen": "a", "rejected": ["b"]}'], r"`chosen` must be a non-empty list"),
        (['{"prompt": "q", "chosen": "a", "rejected": "b"}', '{"chosen": "a", "rejected": "b"}'], r":2 mixes formats"),
        (['{"prompt": "q", "answer": "1"}', '{"prompt": "q", "answer": "1", "extra": 2}'], r":2 mixes formats"),
        (['{"prompt": 5}'], r"`prompt` must be a non-empty list"),
    ],
)
def test_user_file_new_layouts_malformed(tmp_path, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(RecipeError, match=message):
        read_jsonl_examples(path)
