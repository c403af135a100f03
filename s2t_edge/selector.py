"""Selectors: pick the next token among the step's top-K candidates."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from s2t_edge.candidates import Step


class Selector(Protocol):
    name: str

    def select(self, step: Step) -> int:
        """The chosen token id (normally one of `step.cands.ids`)."""
        ...


class Greedy:
    """The SLM's own top-1 (the default)."""

    name = "greedy"

    def select(self, step: Step) -> int:
        return int(step.cands.ids[0])


class Sample:
    """Temperature / top-k / top-p sampling over the candidates, seedable."""

    name = "sample"

    def __init__(self, temperature: float = 0.7, top_p: float = 1.0, top_k: int = 40, seed: int | None = None) -> None:
        if temperature <= 0:
            raise ValueError("temperature must be > 0 for sampling (0 means greedy)")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.rng = np.random.default_rng(seed)

    def select(self, step: Step) -> int:
        c = step.cands
        return sample_token(c.ids, c.logits, self.temperature, self.top_p, self.top_k, self.rng)


def sample_token(
    ids: np.ndarray, logits: np.ndarray, temperature: float, top_p: float, top_k: int, rng: np.random.Generator
) -> int:
    """Sample from logits sorted best first, keeping top-k then the smallest top-p nucleus."""
    # shift before scaling: a tiny temperature turns logits into ±inf, and inf - inf is NaN
    z = logits[:top_k].astype(np.float64)
    with np.errstate(over="ignore"):  # -inf for a tiny temperature: exp gives 0, as meant
        p = np.exp((z - z[0]) / temperature)
    p /= p.sum()
    # min(): with top_p=1 rounding can leave cumsum[-1] < 1 and searchsorted past the end
    keep = min(int(np.searchsorted(np.cumsum(p), top_p) + 1), p.shape[0])
    p = p[:keep] / p[:keep].sum()
    return int(ids[rng.choice(keep, p=p)])
