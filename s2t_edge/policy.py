"""Decoding policies: a named (trigger, selector, K) triple the decode loop runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from s2t_edge.selector import Greedy, Sample, Selector
from s2t_edge.trigger import Always, Never, Trigger

SAMPLED_ADAPTED = "s2t-local-sample"  # sampling that draws from the SLM with its bundle's adapter on


@dataclass
class Policy:
    name: str
    k: int = 8
    trigger: Trigger = field(default_factory=Never)
    selector: Selector = field(default_factory=Greedy)
    needs_hidden: bool = False  # the engine must expose the final hidden state

    def decode_args(self) -> dict:
        return {"k": self.k, "trigger": self.trigger, "selector": self.selector}


def greedy(k: int = 8) -> Policy:
    return Policy("greedy", k=k)


def sampling(
    temperature: float, top_p: float = 1.0, top_k: int = 40, seed: int | None = None, name: str = "sample"
) -> Policy:
    """Plain sampling: the selector draws at every step from the top-k candidates (named
    SAMPLED_ADAPTED by callers when it draws from the adapted SLM)."""
    return Policy(name, k=top_k, trigger=Always(), selector=Sample(temperature, top_p, top_k, seed))
