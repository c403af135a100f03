"""The decode loop: SLM step → top-K candidates → trigger → selector → next token."""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from s2t_edge.candidates import Step, candidates
from s2t_edge.engine import Engine
from s2t_edge.selector import Greedy, Selector
from s2t_edge.trigger import Never, Trigger


@dataclass
class DecodeStats:
    """Per-generation counters; `model_s` is time inside llama.cpp, `ours_s` everything else."""

    prompt_tokens: int = 0
    steps: int = 0
    triggers: int = 0
    flips: int = 0  # selected token != the SLM's top-1
    model_s: float = 0.0  # includes the prompt's prefill (prefill_s)
    ours_s: float = 0.0
    prefill_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose cells were already cached (another slot's or its own), not recomputed
    finish_reason: str = ""  # "stop" (end-of-turn token), "length" (max tokens or context full)
    stop_token: int | None = None  # the end-of-turn token that ended it (not yielded)

    def count(self, fired: bool, flipped: bool) -> None:
        """One decision step: the trigger fired or not, the token differs from the top-1 or not."""
        self.steps += 1
        self.triggers += fired
        self.flips += flipped

    @property
    def tokens_per_s(self) -> float:
        """Decode speed (the prompt's prefill excluded)."""
        total = self.model_s - self.prefill_s + self.ours_s
        return self.steps / total if total > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = round(self.tokens_per_s, 2)
        d["trigger_rate"] = self.triggers / self.steps if self.steps else 0.0
        d["flip_rate"] = self.flips / self.steps if self.steps else 0.0
        return d


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # decoded text this token completes ('' while a UTF-8 character is incomplete)
    triggered: bool
    flipped: bool


def decode(
    engine: Engine,
    prompt: Sequence[int],
    *,
    max_tokens: int = 512,
    k: int = 8,
    trigger: Trigger | None = None,
    selector: Selector | None = None,
    stats: DecodeStats | None = None,
) -> Iterator[Token]:
    """Generate up to `max_tokens` after `prompt`, yielding tokens as they are accepted.

    Stops at an end-of-generation token (not yielded) or when the context is full. `stats` is
    filled in place, so a caller that stops early (Ctrl-C) still has the counts so far.
    """
    trigger = trigger or Never()
    selector = selector or Greedy()
    stats = stats if stats is not None else DecodeStats()
    stats.prompt_tokens = len(prompt)
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    context = list(prompt)

    t0 = time.perf_counter()
    logits = engine.load(context)
    t1 = time.perf_counter()
    stats.model_s += t1 - t0
    stats.prefill_s += t1 - t0
    stats.finish_reason = "length"
    for i in range(max_tokens):
        cands = candidates(logits, k)
        step = Step(context, len(prompt), cands, engine.hidden)
        fired = trigger.fires(step)
        token = selector.select(step) if fired else int(cands.ids[0])
        flipped = token != int(cands.ids[0])
        stats.count(fired, flipped)
        if engine.is_eog(token):
            stats.finish_reason = "stop"
            stats.stop_token = token
            stats.ours_s += time.perf_counter() - t1
            return
        context.append(token)
        text = utf8.decode(engine.token_bytes(token))
        t2 = time.perf_counter()
        stats.ours_s += t2 - t1
        yield Token(token, text, fired, flipped)
        if i == max_tokens - 1 or engine.n_past >= engine.n_ctx_seq:
            return  # max tokens, or context full (a documented truncation): finish_reason "length"
        t2 = time.perf_counter()  # time the consumer spent is neither ours nor the model's
        logits = engine.step(token)
        t1 = time.perf_counter()
        stats.model_s += t1 - t2
