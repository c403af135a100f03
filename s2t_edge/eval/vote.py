"""Majority vote over sampled answers (a real vote, not pass@k)."""

from __future__ import annotations

from s2t_edge.eval.grading import normalize_number


def majority_vote(answers: list[str | None]) -> tuple[str | None, int]:
    """Return (winning answer, its count) over normalised answers.

    Answers are compared after `normalize_number` (non-numeric ones as stripped strings);
    None and empty answers are ignored. Ties: among the answers with the top count, the one
    that appeared first in sample order wins. All None → (None, 0).
    """
    counts: dict[str, int] = {}  # insertion order = first appearance
    for a in answers:
        if a is None or not a.strip():
            continue
        key = normalize_number(a) or a.strip()
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None, 0
    winner = max(counts, key=lambda k: counts[k])  # max keeps the first of equal maxima
    return winner, counts[winner]
