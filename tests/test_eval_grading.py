"""Answer extraction, number normalisation, grading and majority vote on realistic outputs."""

import pytest

from s2t_edge.eval.grading import SYSTEM_PROMPT, extract_answer, is_correct, normalize_number
from s2t_edge.eval.vote import majority_vote


def test_system_prompt_asks_for_steps_and_boxed():
    assert "step by step" in SYSTEM_PROMPT and "\\boxed{}" in SYSTEM_PROMPT


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Janet has 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = 18 dollars.\n\\boxed{18}", "18"),
        ("So the total is \\boxed{\\frac{1}{2}} of the cake.", "\\frac{1}{2}"),
        ("First guess \\boxed{12}. Wait, recheck: \\boxed{14}", "14"),
        ("Final: \\boxed {72}", "72"),
        ("$$\\boxed{\\text{18 eggs}}$$", "\\text{18 eggs}"),
        ("\\boxed{\\dfrac{\\sqrt{4}}{2}} nested", "\\dfrac{\\sqrt{4}}{2}"),
        ("Truncated at the end \\boxed{7} and \\boxed{1", "7"),
        ("She pays 3 * 360 = 1080.\nThe answer is $1,080.", "1,080"),
        ("**Step 1:** 5 + 5 = 10\n\n**Final Answer:** 42 apples", "42"),
        ("THE ANSWER IS -3 degrees, then 5 more words with 9", "-3"),
        ("answer: 12.5. Double-check: 25 / 2 = 12.5 and 7 more", "12.5"),
        ("The answer is unclear. He had 5 apples and ate 2, leaving 3", "3"),
        ("He walked 3 miles, then 4 more, so 7 miles in total.", "7"),
        ("Compute 5-3=2", "2"),
        ("The answer is:\n\n**42**", "42"),
        ("The answer is approximately 3.5 hours.", "3.5"),
        ("So the answer is 10. Let me double check: 2 * 5 = 10. Yes.", "10"),
        ("I cannot solve this problem.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("18", "18"),
        ("18 dollars", "18"),
        ("$18.00", "18"),
        ("\\$18", "18"),
        ("18%", "18"),
        ("50%", "50"),
        ("50\\%", "50"),
        ("\\text{18 eggs}", "18"),
        ("18 \\text{ eggs}", "18"),
        ("1,080", "1080"),
        ("$1,080.50", "1080.5"),
        ("18.0", "18"),
        ("-7", "-7"),
        ("\u22127", "-7"),
        ("-0.0", "0"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{3}{4}", "0.75"),
        ("-\\frac{1}{4}", "-0.25"),
        ("\\frac12", "0.5"),
        ("3/8", "0.375"),
        ("1/3", "0.333333"),
        ("2/3", "0.666667"),
        ("x = 5", "5"),
        ("45^\\circ", "45"),
        ("12 m^2", "12"),
        ("{42}", "42"),
        ("1/0", None),
        ("1, 2", None),
        ("18 or 20", None),
        ("eighteen", None),
        ("", None),
    ],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("1,080", "1080", True),
        ("\\frac{1}{2}", "0.5", True),
        ("18.00", "18", True),
        ("\\text{18 eggs}", "18", True),
        ("1/3", "0.333333", True),
        ("17", "18", False),
        ("1/3", "0.33", False),
        (None, "18", False),
        ("blue", "blue", True),
        ("blue ", "Blue", False),
        ("18 or 20", "18", False),
    ],
)
def test_is_correct(pred, gold, ok):
    assert is_correct(pred, gold) is ok


def test_end_to_end_grading_of_model_output():
    out = "Each box holds 12, and there are 90 boxes: 12 * 90 = 1080.\nThe answer is $1,080."
    assert is_correct(extract_answer(out), "1080")
    assert not is_correct(extract_answer("No idea."), "1080")


def test_majority_vote_counts_normalised_answers():
    assert majority_vote(["18", "$18.00", "\\boxed{x}", "17", "18 dollars"]) == ("18", 3)


def test_majority_vote_ignores_none_and_blank():
    assert majority_vote([None, "5", None, " ", "6", "5"]) == ("5", 2)


def test_majority_vote_all_none():
    assert majority_vote([None, None]) == (None, 0)
    assert majority_vote([]) == (None, 0)


def test_majority_vote_tie_goes_to_first_seen():
    assert majority_vote(["7", "9", "9", "7"]) == ("7", 2)
    assert majority_vote([None, "9", "7", "7.0", "9"]) == ("9", 2)


def test_majority_vote_is_a_vote_not_pass_at_k():
    # the gold answer appears once but loses the vote
    winner, count = majority_vote(["12", "12", "18"])
    assert (winner, count) == ("12", 2)
    assert not is_correct(winner, "18")


def test_majority_vote_non_numeric_answers():
    assert majority_vote(["yes", "no", "yes "]) == ("yes", 2)


def test_truncated_answers_are_graded_on_an_explicit_answer_only():
    # cut off at max tokens while echoing the question: its last number is not an answer
    cut = "Tom has 3 apples and buys 2 more. First, 3 + 2 = 5 apples. Then he gives away 2, so"
    assert extract_answer(cut) == "2"  # an answer that ended by itself keeps the last-number rule
    assert extract_answer(cut, complete=False) is None
    assert not is_correct(extract_answer(cut, complete=False), "2")
    # an explicit final answer still counts, cut or not
    assert extract_answer("so the answer is 5. Let me also check", complete=False) == "5"
    assert extract_answer("Total: \\boxed{12} and then", complete=False) == "12"


def test_eval_records_count_truncation(tmp_path):
    from s2t_edge.eval.results import summarize

    recs = [{"id": "a", "correct": True, "truncated": 0}, {"id": "b", "correct": False, "truncated": 1}]
    assert summarize(recs)["truncated"] == 1


def test_tally_votes_on_the_final_answers() -> None:
    """`tally` reads each sample's answer (a cut-off one only from an explicit final answer),
    votes on normalised numbers and points at the first sample that gave the winner."""
    from s2t_edge.eval.vote import tally

    texts = {1: "so 3 + 3 = 6", 2: "The answer is 5.", 3: "\\boxed{5.0}", 4: "still adding 7"}

    class Words:
        def detokenize(self, ids: list[int]) -> str:
            return texts[ids[0]]

    t = tally(Words(), [[1], [2], [3], [4, 0, 0]], max_tokens=3)  # type: ignore[arg-type]
    assert t.answers == ["6", "5", "5.0", None]  # the last one was cut off at 3 tokens
    assert (t.pred, t.votes, t.winner, t.truncated, t.tokens) == ("5", 2, 1, 1, 6)
    assert t.texts[t.winner] == "The answer is 5."
    none = tally(Words(), [[4, 0, 0]], max_tokens=3)  # type: ignore[arg-type]
    assert (none.pred, none.votes, none.winner) == (None, 0, 0)
