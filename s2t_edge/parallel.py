"""N samples that share the prompt's KV cache and advance as N sequences of one llama.cpp batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from s2t_edge.candidates import candidates
from s2t_edge.engine import Engine
from s2t_edge.selector import sample_token


def sample_parallel(
    engine: Engine,
    prompt: Sequence[int],
    n: int,
    *,
    max_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.8,
    top_k: int = 20,
    seed: int | None = None,
) -> list[list[int]]:
    """`n` sampled continuations of `prompt` (end-of-turn tokens not included).

    The prompt is prefilled once into sequence 0 and shared with sequences 1..n-1; each step
    decodes one token for every unfinished sequence in a single batch. The engine is reset after.
    """
    rng = np.random.default_rng(seed)
    engine.reset()
    first = engine.load(prompt).copy()
    engine.fork(n)
    outs: list[list[int]] = [[] for _ in range(n)]
    rows = [first] * n
    active = list(range(n))
    pos = len(prompt)
    try:
        for _ in range(max_tokens):
            picks = []
            for logits in rows:
                c = candidates(logits, top_k)
                picks.append(sample_token(c.ids, c.logits, temperature, top_p, top_k, rng))
            still = [(s, t) for s, t in zip(active, picks) if not engine.is_eog(t)]
            for s, t in still:
                outs[s].append(t)
            if not still or pos >= engine.n_ctx_seq:
                break
            active = [s for s, _ in still]
            rows = engine.step_many([t for _, t in still], active, pos)
            pos += 1
    finally:
        engine.reset()
    return outs
