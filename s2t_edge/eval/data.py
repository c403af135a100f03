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
    skipped = 0
    with p.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            try:
                problems.append(_parse_line(line, p, line_no, question_field, answer_field, len(problems)))
            except S2TError:
                if not skip_bad:
                    raise
                skipped += 1
    return problems, skipped


def _parse_line(line: str, p: Path, line_no: int, q_field: str, a_field: str, index: int) -> Problem:
    where = f"{p.name}:{line_no}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise S2TError(f"{where}: not valid JSON ({e.msg}); fix it or use --skip-bad") from None
    if not isinstance(obj, dict):
        raise S2TError(f"{where}: not a JSON object; fix it or use --skip-bad")
    for field, flag in ((q_field, "--question-field"), (a_field, "--answer-field")):
        if field not in obj:
            raise S2TError(f"{where}: no field '{field}' (use {flag})")
    pid = str(obj["id"]) if obj.get("id") is not None else f"{p.stem}:{line_no}"
    return Problem(id=pid, question=str(obj[q_field]), gold=gold_answer(str(obj[a_field])), index=index)
