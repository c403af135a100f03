"""Load GSM8K-style JSONL problems into `Problem` records."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from s2t_edge.errors import S2TError

_GSM8K_FINAL = re.compile(r".*####\s*(.+?)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    """One problem: a stable id, the question text, the gold answer and its 0-based index."""

    id: str
    question: str
    gold: str
    index: int


def gold_answer(answer: str) -> str:
    """The gold answer: N from a GSM8K `... #### N` field (commas removed), else the field."""
    m = _GSM8K_FINAL.search(answer)
    if m:
        return m.group(1).replace(",", "").strip()
    return answer.strip()


def load_problems(
    path: str | Path,
    question_field: str = "question",
    answer_field: str = "answer",
    limit: int | None = None,
    skip_bad: bool = False,
) -> tuple[list[Problem], int]:
    """Read problems from a JSONL file; return (problems, number of skipped bad lines).

    Ids are the line's `id` field if present, else `"{file stem}:{1-based line number}"`,
    so they stay stable when bad lines are skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise S2TError(f"data file not found: {p}")
    problems: list[Problem] = []
    seen: set[str] = set()
    skipped = 0
    try:
        f = p.open("rb")
    except OSError as e:
        raise S2TError(f"{p}: cannot read ({e.strerror})") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            if limit is not None and len(problems) >= limit:
                break
            if not raw.strip():
                continue
            try:
                prob = _parse_line(raw, p, line_no, question_field, answer_field, len(problems))
                if prob.id in seen:
                    raise S2TError(f"{p.name}:{line_no}: duplicate id {prob.id!r}; fix it or use --skip-bad")
            except S2TError:
                if not skip_bad:
                    raise
                skipped += 1
                continue
            seen.add(prob.id)
            problems.append(prob)
    if not problems:
        raise S2TError(f"{p}: no problems" + (f" ({skipped} bad lines skipped)" if skipped else ""))
    return problems, skipped


def _parse_line(raw: bytes, p: Path, line_no: int, q_field: str, a_field: str, index: int) -> Problem:
    where = f"{p.name}:{line_no}"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise S2TError(f"{where}: not UTF-8 text; fix it or use --skip-bad") from None
    except json.JSONDecodeError as e:
        raise S2TError(f"{where}: not valid JSON ({e.msg}); fix it or use --skip-bad") from None
    if not isinstance(obj, dict):
        raise S2TError(f"{where}: not a JSON object; fix it or use --skip-bad")
    for field, flag in ((q_field, "--question-field"), (a_field, "--answer-field")):
        if field not in obj:
            raise S2TError(f"{where}: no field '{field}' (use {flag})")
    question, answer = obj[q_field], obj[a_field]
    if not isinstance(question, str) or not question.strip():
        raise S2TError(f"{where}: field '{q_field}' is not a non-empty string; fix it or use --skip-bad")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise S2TError(f"{where}: field '{a_field}' is not a string or a number; fix it or use --skip-bad")
    pid = obj.get("id")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, (str, int))):
        raise S2TError(f"{where}: field 'id' is not a string or an integer; fix it or use --skip-bad")
    pid = str(pid) if pid is not None else f"{p.stem}:{line_no}"
    return Problem(id=pid, question=question, gold=gold_answer(str(answer)), index=index)
