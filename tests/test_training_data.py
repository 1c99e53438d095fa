import json
from importlib.resources import files

import pytest

from canopy_monitor.recipe import DatasetConfig, RecipeError
from canopy_monitor.training_data import (
    MAX_SUMMARY_CHARS,
    build_python_docstring_examples,
    build_training_dataset,
    read_jsonl_examples,
    summarize_docstring,
)


@pytest.fixture(scope="module")
def all_examples():
    return build_python_docstring_examples(seed=0)


def test_builtin_set_has_thousands(all_examples):
    assert len(all_examples) > 2000


def test_builtin_conversations_well_formed(all_examples):
    for row in all_examples:
        assert list(row) == ["messages"]
        user, assistant = row["messages"]
        assert user["role"] == "user"
        assert assistant["role"] == "assistant"
        assert user["content"].strip()
        assert assistant["content"].strip()
        assert assistant["content"][-1] in ".!?"


def test_builtin_answers_short(all_examples):
    # An answer about a signature adds the call syntax to one sentence of at most MAX_SUMMARY_CHARS.
    longest = max(len(row["messages"][1]["content"]) for row in all_examples)

    assert longest <= MAX_SUMMARY_CHARS + 120


def test_builtin_known_example_present(all_examples):
    questions = {row["messages"][0]["content"]: row["messages"][1]["content"] for row in all_examples}

    assert questions["How do I call `textwrap.dedent`?"] == (
        "Call it as `textwrap.dedent(text)`. Remove any common leading whitespace from every line in `text`."
    )
    assert questions["Which Python module provides `namedtuple`?"] == (
        "`namedtuple` is provided by the `collections` module. Returns a new subclass of tuple with named fields."
    )


def test_builtin_questions_unique(all_examples):
    questions = [row["messages"][0]["content"] for row in all_examples]

    assert len(set(questions)) == len(questions)
    # `dumps` is in both `json` and `pickle`, so it has no "which module" question.
    assert "Which Python module provides `dumps`?" not in questions


def test_dataset_deterministic_for_seed():
    first = build_training_dataset(DatasetConfig(num_examples=50, seed=3))
    second = build_training_dataset(DatasetConfig(num_examples=50, seed=3))

    assert first["messages"] == second["messages"]


def test_dataset_seed_changes_order():
    first = build_training_dataset(DatasetConfig(num_examples=50, seed=3))
    second = build_training_dataset(DatasetConfig(num_examples=50, seed=4))

    assert first["messages"] != second["messages"]


def test_dataset_size_as_configured():
    dataset = build_training_dataset(DatasetConfig(num_examples=123))

    assert len(dataset) == 123
    assert dataset.column_names == ["messages"]


def test_dataset_all_examples_without_limit(all_examples):
    dataset = build_training_dataset(DatasetConfig(num_examples=None))

    assert len(dataset) == len(all_examples)


def test_dataset_too_many_examples_raises(all_examples):
    with pytest.raises(RecipeError, match=f"has only {len(all_examples)} examples"):
        build_training_dataset(DatasetConfig(num_examples=len(all_examples) + 1))


def test_unknown_dataset_name_raises():
    with pytest.raises(RecipeError, match="Unknown dataset.name 'wikipedia'.*python-docstrings"):
        build_training_dataset(DatasetConfig(name="wikipedia"))


def test_heldout_prompts_not_in_training_set(all_examples):
    text = files("canopy_monitor").joinpath("data", "heldout_prompts.jsonl").read_text(encoding="utf-8")
    heldout = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    questions = {row["messages"][0]["content"] for row in all_examples}

    assert len(heldout) >= 20
    assert len(set(heldout)) == len(heldout)
    assert not questions.intersection(heldout)


# Docstring summaries


def test_summary_skips_signature_line():
    doc = "loads(s) -> obj\n\nDecode ``s`` into an object.\nSecond line.\n\nDetails."

    assert summarize_docstring(doc) == "Decode `s` into an object. Second line."


def test_summary_cut_to_whole_sentences():
    sentence = "This sentence is exactly fifty characters long ok. "
    doc = sentence * 10

    summary = summarize_docstring(doc)

    assert len(summary) <= MAX_SUMMARY_CHARS
    assert summary.endswith("ok.")
    assert summary.count("ok.") == 5


@pytest.mark.parametrize("doc", [None, "", "Short.", ">>> f(1)\n2", "Example:\n  x", "lowercase start of text here."])
def test_summary_rejects_unusable(doc):
    assert summarize_docstring(doc) is None


# User files


def write_jsonl(tmp_path, records):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


def test_user_file_messages(tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    path = write_jsonl(tmp_path, [{"messages": messages, "extra": 1}] * 3)

    dataset = build_training_dataset(DatasetConfig(path=str(path)))

    assert len(dataset) == 3
    assert dataset.column_names == ["messages"]
    assert dataset[0]["messages"] == messages


def test_user_file_prompt_completion(tmp_path):
    records = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(10)]
    path = write_jsonl(tmp_path, records)

    dataset = build_training_dataset(DatasetConfig(path=str(path), num_examples=4, seed=1))

    assert len(dataset) == 4
    assert sorted(dataset.column_names) == ["completion", "prompt"]
    for row in dataset:
        assert row["completion"] == "A" + row["prompt"][1:]


def test_user_file_missing_raises(tmp_path):
    with pytest.raises(RecipeError, match="Dataset file not found"):
        read_jsonl_examples(tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["not json"], r"data.jsonl:1 is not valid JSON"),
        (["[1, 2]"], r"data.jsonl:1 must be a JSON object"),
        (['{"text": "x"}'], r"data.jsonl:1 needs a `messages` field"),
        (['{"messages": []}'], r"`messages` must be a non-empty list"),
        (['{"messages": [{"role": "user"}]}'], r"needs string `role` and `content`"),
        (['{"prompt": "q", "completion": 3}'], r"`prompt` must be a non-empty list"),
        (['{"prompt": "q", "completion": "a"}', '{"messages": [{"role": "user", "content": "x"}]}'], r":2 mixes formats"),
        (["", "  "], r"contains no examples"),
    ],
)
def test_user_file_malformed_raises(tmp_path, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(RecipeError, match=message):
        read_jsonl_examples(path)
