"""Majority vote over sampled answers (a real vote, not pass@k): the vote itself, and N samples of
one prompt tallied into it (`eval`'s maj@N records, `generate --votes N`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from s2t_edge.eval.grading import extract_answer, normalize_number

if TYPE_CHECKING:  # the vote itself stays importable without llama.cpp (offline analysis)
    from s2t_edge.engine import Engine


def majority_vote(answers: list[str | None]) -> tuple[str | None, int]:
    """Return (winning answer, its count) over normalised answers.

    Answers are compared after `normalize_number` (non-numeric ones as stripped strings);
    None and empty answers are ignored. Ties: among the answers with the top count, the one
    that appeared first in sample order wins. All None → (None, 0).
    """
    counts: dict[str, int] = {}  # insertion order = first appearance
    for a in answers:
        key = answer_key(a)
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None, 0
    winner = max(counts, key=lambda k: counts[k])  # max keeps the first of equal maxima
    return winner, counts[winner]


def answer_key(answer: str | None) -> str | None:
    """The key an answer is voted under: its normalised number, else the stripped text; None for none."""
    if answer is None or not answer.strip():
        return None
    return normalize_number(answer) or answer.strip()


@dataclass
class Tally:
    """N sampled answers to one prompt and their vote."""

    texts: list[str]
    answers: list[str | None]  # each text's final answer (None: none, or cut off without one)
    pred: str | None  # the winning answer
    votes: int  # how many samples gave it
    tokens: int  # over all samples
    truncated: int  # samples cut off at max tokens

    @property
    def winner(self) -> int:
        """Index of the first sample that gave the winning answer (0 when no sample answered)."""
        return next((i for i, a in enumerate(self.answers) if self.pred is not None and answer_key(a) == self.pred), 0)


def tally(engine: Engine, samples: Sequence[Sequence[int]], max_tokens: int) -> Tally:
    """Detokenize sampled continuations, read each one's answer and vote."""
    texts = [engine.detokenize(list(x)) for x in samples]
    cut = [len(x) >= max_tokens for x in samples]  # no end-of-turn within max tokens
    answers = [extract_answer(t, complete=not c) for t, c in zip(texts, cut)]
    pred, votes = majority_vote(answers)
    return Tally(texts, answers, pred, votes, sum(len(x) for x in samples), sum(cut))


def vote(
    engine: Engine,
    prompt: Sequence[int],
    n: int,
    *,
    max_tokens: int = 512,
    temperature: float | None = None,
    seed: int | None = None,
) -> Tally:
    """maj@N of one prompt: `n` samples as one batch (see `parallel.sample_batch`), voted;
    `temperature` defaults to `parallel.VOTE_TEMPERATURE`."""
    from s2t_edge.parallel import VOTE_TEMPERATURE, sample_parallel

    temperature = VOTE_TEMPERATURE if temperature is None else temperature
    samples = sample_parallel(engine, prompt, n, max_tokens=max_tokens, temperature=temperature, seed=seed)
    return tally(engine, samples, max_tokens)
