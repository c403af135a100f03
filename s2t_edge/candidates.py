"""Top-K next-token candidates and the step features the trigger and selector read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_K = 64  # the CLI caps --k at 32; sampling may look at more
_STRIDE = 16  # subsample stride for the threshold; 151,936 / 16 = 9,496 values


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, best first; ties go to the lower id (as llama.cpp's greedy).

    A full `argpartition` over a 151,936-id vocabulary is the slow way. The k-th largest value of a
    strided subsample is a lower bound on the k-th largest overall, so `logits >= bound` keeps a
    small superset of the true top-k that we partition instead (exact, not approximate).
    """
    if not 1 <= k <= min(MAX_K, logits.shape[0]):
        raise ValueError(f"k must be between 1 and {min(MAX_K, logits.shape[0])}, got {k}")
    sub = logits[::_STRIDE]
    if sub.shape[0] >= k:
        bound = np.partition(sub, sub.shape[0] - k)[sub.shape[0] - k]
        ids = np.flatnonzero(logits >= bound)
    else:
        ids = np.arange(logits.shape[0])
    if ids.shape[0] > k:
        # argpartition would cut ties at the k-th value arbitrarily: keep everything above it,
        # then the lowest tied ids (`ids` is ascending).
        vals = logits[ids]
        kth = np.partition(vals, vals.shape[0] - k)[vals.shape[0] - k]
        above = ids[vals > kth]
        ids = np.concatenate([above, ids[vals == kth][: k - above.shape[0]]])
    return ids[np.lexsort((ids, -logits[ids]))]


@dataclass(frozen=True)
class Candidates:
    """The SLM's top-K at one step: ids and logits best first, plus cheap step features."""

    ids: np.ndarray  # int64[K]
    logits: np.ndarray  # float32[K]

    @property
    def logprobs(self) -> np.ndarray:
        """Log-probabilities renormalised over the top-K support."""
        z = self.logits - self.logits[0]
        return z - np.log(np.exp(z).sum())

    @property
    def entropy(self) -> float:
        """Entropy (nats) of the distribution renormalised over the top-K support."""
        lp = self.logprobs
        return float(-(np.exp(lp) * lp).sum())

    @property
    def margin(self) -> float:
        """Logit gap between the first and second candidate."""
        return float(self.logits[0] - self.logits[1]) if self.logits.shape[0] > 1 else float("inf")


def candidates(logits: np.ndarray, k: int = 8) -> Candidates:
    """Top-k candidates of one step's logits (copied out of llama.cpp's buffer)."""
    ids = top_k(logits, k)
    return Candidates(ids=ids.astype(np.int64), logits=logits[ids].astype(np.float32))


@dataclass(frozen=True)
class Step:
    """What a trigger or selector sees at one decode step."""

    context: list[int]  # prompt + accepted tokens so far (the tokens the SLM has decoded)
    n_prompt: int
    cands: Candidates
    hidden: np.ndarray | None  # the SLM's final hidden state at this step, when enabled
