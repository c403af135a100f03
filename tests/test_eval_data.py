"""Loading JSONL problems: gold extraction, ids, bad lines, limits."""

import json

import pytest

from s2t_edge.errors import S2TError
from s2t_edge.eval.data import Problem, gold_answer, load_problems


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(q, a, **extra):
    return json.dumps({"question": q, "answer": a, **extra})


def test_gsm8k_gold_and_ids(tmp_path):
    f = _write(
        tmp_path / "data.jsonl",
        [
            _row("How many?", "3 + 4 = <<3+4=7>>7\n#### 7"),
            "",
            _row("How much?", "He pays 1,000 + 80\n#### 1,080", id="gsm-42"),
            "   ",
            _row("Which color?", "  blue \n"),
        ],
    )
    problems, skipped = load_problems(f)
    assert skipped == 0
    assert problems == [
        Problem(id="data:1", question="How many?", gold="7", index=0),
        Problem(id="gsm-42", question="How much?", gold="1080", index=1),
        Problem(id="data:5", question="Which color?", gold="blue", index=2),
    ]


def test_gold_answer_uses_last_marker():
    assert gold_answer("a #### 1\nb #### -2,500") == "-2500"
    assert gold_answer(" 0.5 ") == "0.5"


def test_custom_fields_and_limit(tmp_path):
    f = _write(tmp_path / "m.jsonl", [json.dumps({"problem": f"q{i}", "solution": str(i)}) for i in range(5)])
    problems, _ = load_problems(f, question_field="problem", answer_field="solution", limit=2)
    assert [(p.question, p.gold) for p in problems] == [("q0", "0"), ("q1", "1")]


def test_bad_json_names_file_and_line(tmp_path):
    f = _write(tmp_path / "data.jsonl", [_row("q", "1"), "", "{not json"])
    with pytest.raises(S2TError, match=r"^data\.jsonl:3: not valid JSON \("):
        load_problems(f)


def test_non_object_line_is_refused(tmp_path):
    f = _write(tmp_path / "data.jsonl", ["[1, 2]"])
    with pytest.raises(S2TError, match=r"data\.jsonl:1: not a JSON object"):
        load_problems(f)


def test_missing_field_suggests_flag(tmp_path):
    f = _write(tmp_path / "data.jsonl", [_row("q", "1"), _row("q", "2"), json.dumps({"question": "q"})])
    with pytest.raises(S2TError, match=r"data\.jsonl:3: no field 'answer' \(use --answer-field\)"):
        load_problems(f)
    with pytest.raises(S2TError, match=r"no field 'problem' \(use --question-field\)"):
        load_problems(f, question_field="problem")


def test_skip_bad_counts_and_keeps_ids_stable(tmp_path):
    f = _write(
        tmp_path / "data.jsonl",
        [
            _row("a", "1"),
            "{oops",
            json.dumps({"question": "no answer"}),
            "42",
            _row("b", "2"),
        ],
    )
    problems, skipped = load_problems(f, skip_bad=True)
    assert skipped == 3
    assert [(p.id, p.index) for p in problems] == [("data:1", 0), ("data:5", 1)]


def test_missing_file(tmp_path):
    with pytest.raises(S2TError, match="not found"):
        load_problems(tmp_path / "nope.jsonl")
