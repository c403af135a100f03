"""The teacher side of S2T: scoring SLM candidates, selecting at divergence points, the KL trigger.

The teacher keeps its own KV cache in lockstep with the accepted tokens lazily: it catches up
(one batched prefill of the backlog, via `Engine.load`) only when it is asked for a score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from s2t_edge.candidates import Step
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError


def check_same_vocab(slm: Engine, teacher: Engine) -> None:
    """Teacher scores apply to SLM ids only when both share one tokenizer."""
    if slm.n_vocab != teacher.n_vocab:
        raise S2TError(
            f"teacher vocabulary ({teacher.n_vocab} ids, {teacher.path.name}) differs from the "
            f"SLM's ({slm.n_vocab} ids, {slm.path.name}); S2T needs one shared tokenizer"
        )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=False)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


@dataclass(frozen=True)
class TeacherView:
    """The teacher's opinion at one position, restricted to what collection stores."""

    probs_on: np.ndarray  # teacher probability of each SLM candidate id
    top1: int  # teacher's full-vocabulary argmax
    top1_prob: float


def teacher_view(logits: np.ndarray, ids: np.ndarray) -> TeacherView:
    lp = log_softmax(logits)
    top1 = int(np.argmax(logits))
    return TeacherView(np.exp(lp[ids]).astype(np.float32), top1, float(np.exp(lp[top1])))


def kl_on_support(teacher_probs: np.ndarray, slm_logprobs: np.ndarray) -> float:
    """KL(teacher || SLM) with both distributions renormalised over the SLM's top-K ids."""
    p = teacher_probs.astype(np.float64) + 1e-12
    p /= p.sum()
    return float((p * (np.log(p) - slm_logprobs.astype(np.float64))).sum())


class TeacherSelector:
    """`s2t`: argmax of the teacher's probability over the SLM's candidates.
    `takeover`: the teacher's own full-vocabulary top-1 (the baseline)."""

    def __init__(self, teacher: Engine, mode: str = "s2t") -> None:
        if mode not in ("s2t", "takeover"):
            raise ValueError(f"unknown teacher mode {mode!r}")
        self.teacher, self.mode, self.name = teacher, mode, mode
        self._cache: tuple[int, np.ndarray] | None = None

    def logits(self, step: Step) -> np.ndarray:
        """Teacher logits after `step.context`, computed once per position."""
        n = len(step.context)
        if self._cache is None or self._cache[0] != n or self.teacher.tokens != step.context:
            self._cache = (n, self.teacher.load(step.context).copy())
        return self._cache[1]

    def select(self, step: Step) -> int:
        return teacher_choice(self.logits(step), step.cands.ids, self.mode)


def teacher_choice(logits: np.ndarray, cand_ids: np.ndarray, mode: str) -> int:
    """s2t: the candidate the teacher likes best; takeover: the teacher's own top-1."""
    if mode == "takeover":
        return int(np.argmax(logits))
    return int(cand_ids[int(np.argmax(logits[cand_ids]))])


class KLTrigger:
    """Fire where KL(teacher || SLM) on the top-K support is at least `threshold`.

    Needs the teacher at every step; the threshold is a quantile calibrated on training problems.
    """

    name = "kl"

    def __init__(self, selector: TeacherSelector, threshold: float) -> None:
        self.selector, self.threshold = selector, threshold

    def fires(self, step: Step) -> bool:
        lp = log_softmax(self.selector.logits(step))
        p = np.exp(lp[step.cands.ids])
        return kl_on_support(p, step.cands.logprobs) >= self.threshold
