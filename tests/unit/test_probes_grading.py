"""The answer graders of ``python -m probes label``."""

import pytest

from probes.grading import extract_answer, get_grader, grader_names, last_boxed, normalise_number


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        ("so the total is \\boxed{1,000}.", "1000", True),
        ("The answer is $18.00.", "18", True),
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("first 3 then 5", "5", True),
        ("first 3 then 5", "3", False),
        ("\\boxed{18 \\text{ dollars}}", "18", True),
        ("\\boxed{\\$70}", "70", True),
        ("\\boxed{50\\%}", "50", True),
        ("-3.0", "-3", True),
        ("\\boxed{7} but later \\boxed{8}", "8", True),
        ("\\boxed{7} but later \\boxed{8}", "7", False),
        ("no number at all", "3", False),
        ("", "3", False),
        ("It costs 1,234,567 dollars", "1234567", True),
        ("\\boxed{12.50}", "12.5", True),
    ],
)
def test_math_grader(answer: str, gold: str, expected: bool) -> None:
    assert get_grader("math")(answer, gold) is expected


def test_boxed_with_nested_braces() -> None:
    assert last_boxed("x \\boxed{\\frac{3}{4}} y") == "\\frac{3}{4}"
    assert last_boxed("no box") is None
    assert extract_answer("we get 4 and \\boxed{}; finally 9") == "9"  # an empty box falls back to the number


def test_normalise() -> None:
    assert normalise_number("$1,000.00") == "1000"
    assert normalise_number("3/4") == "0.75"
    assert normalise_number(" 42 ") == "42"


def test_graders_are_chosen_by_name() -> None:
    assert {"math", "exact"} <= set(grader_names())
    assert get_grader("exact")(" Paris ", "paris")
    with pytest.raises(ValueError, match="unknown grader"):
        get_grader("nope")
