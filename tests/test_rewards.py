from fractions import Fraction

import pytest

from canopy_monitor.rewards import (
    COLUMN_CHECKS,
    REWARD_FUNCTIONS,
    answer_value,
    completion_text,
    exact_answer,
    final_number,
    get_reward_functions,
    parse_number,
    required_columns,
)


def assistant(text):
    return [{"role": "assistant", "content": text}]


# Parsing numbers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", Fraction(42)),
        (" -3 ", Fraction(-3)),
        ("1,250", Fraction(1250)),
        ("2.50", Fraction(5, 2)),
        ("0", Fraction(0)),
    ],
)
def test_parse_number_valid(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12a", "1 2", "1,25", "--3", "3."])
def test_parse_number_invalid(text):
    assert parse_number(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Tom has 14 + 8 = 22 apples.", Fraction(22)),
        ("14-8", Fraction(8)),
        ("It is -5 degrees", Fraction(-5)),
        ("The total is 1,250 dollars", Fraction(1250)),
        ("First 3.5, then 2.50", Fraction(5, 2)),
        ("The answer is 7.", Fraction(7)),
        ("12\n\n17", Fraction(17)),
    ],
)
def test_final_number_takes_last(text, expected):
    assert final_number(text) == expected


def test_final_number_none_without_digits():
    assert final_number("no digits here") is None


# Reference answers


@pytest.mark.parametrize(
    ("reference", "expected"),
    [(22, Fraction(22)), ("22", Fraction(22)), ("1,000", Fraction(1000)), (0.1, Fraction(1, 10)), ("-4", Fraction(-4))],
)
def test_answer_value_converts(reference, expected):
    assert answer_value(reference) == expected


@pytest.mark.parametrize("reference", ["twelve", "", "3 apples", None, True, float("nan"), [3]])
def test_answer_value_invalid_raises(reference):
    with pytest.raises(ValueError, match="Invalid reference answer"):
        answer_value(reference)


# exact_answer


def test_exact_answer_text_completions():
    completions = ["14 + 8 = 22", "It is 21.", "22 apples, or maybe 23", "twenty-two"]

    rewards = exact_answer(completions, answer=["22"] * 4)

    assert rewards == [1.0, 0.0, 0.0, 0.0]


def test_exact_answer_conversational_completions():
    completions = [assistant("The answer is 5"), assistant("5.0"), assistant("6")]

    rewards = exact_answer(completions, answer=[5, "5", "5"])

    assert rewards == [1.0, 1.0, 0.0]


def test_exact_answer_reads_last_message():
    completion = [{"role": "assistant", "content": "4"}, {"role": "assistant", "content": "9"}]

    assert exact_answer([completion], answer=["9"]) == [1.0]
    assert exact_answer([completion], answer=["4"]) == [0.0]


@pytest.mark.parametrize(
    "completion",
    [
        "",
        [],
        [{"role": "assistant"}],
        [{"role": "assistant", "content": None}],
        [{"role": "assistant", "content": ["5"]}],
        ["5"],
    ],
)
def test_exact_answer_malformed_scores_zero(completion):
    assert exact_answer([completion], answer=["5"]) == [0.0]


def test_exact_answer_ignores_extra_columns():
    rewards = exact_answer(["7"], answer=["7"], prompts=["q"], trainer_state=None, difficulty=["easy"])

    assert rewards == [1.0]


def test_exact_answer_wrong_type_raises():
    with pytest.raises(TypeError, match="string or a list of messages, got int"):
        exact_answer([7], answer=["7"])


def test_exact_answer_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        exact_answer(["1", "2"], answer=["1"])


def test_exact_answer_bad_reference_raises():
    with pytest.raises(ValueError, match="Invalid reference answer 'n/a'"):
        exact_answer(["1"], answer=["n/a"])


def test_completion_text_forms():
    assert completion_text("plain") == "plain"
    assert completion_text(assistant("chat")) == "chat"
    assert completion_text([]) is None


# Registry


def test_registry_names_functions():
    assert get_reward_functions(["exact_answer"]) == [exact_answer]
    assert REWARD_FUNCTIONS["exact_answer"].__name__ == "exact_answer"


def test_registry_unknown_raises():
    with pytest.raises(ValueError, match="Unknown reward function 'accuracy'. Available: exact_answer"):
        get_reward_functions(["accuracy"])


def test_required_columns_from_signature():
    def custom(completions, answer, unit, scale=1.0, prompts=None, **kwargs):
        return [0.0] * len(completions)

    assert required_columns(exact_answer) == ["answer"]
    assert required_columns(custom) == ["answer", "unit"]


def test_every_required_column_checked():
    for function in REWARD_FUNCTIONS.values():
        for column in required_columns(function):
            assert column in COLUMN_CHECKS
