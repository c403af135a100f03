"""Triggers: decide whether a step is a divergence point where the selector gets to choose."""

from __future__ import annotations

from typing import Protocol

from s2t_edge.candidates import Step


class Trigger(Protocol):
    name: str

    def fires(self, step: Step) -> bool: ...


class Never:
    """Plain decoding: the SLM's top-1 everywhere (the default)."""

    name = "never"

    def fires(self, step: Step) -> bool:
        return False


class Always:
    """Let the selector choose at every step."""

    name = "always"

    def fires(self, step: Step) -> bool:
        return True


class Entropy:
    """SLM-only trigger: fire where the top-K entropy (nats) is at least `threshold`."""

    name = "entropy"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def fires(self, step: Step) -> bool:
        return step.cands.entropy >= self.threshold
