"""maj@N sampling: the N samples of a prompt share its KV cache and advance as N sequences of one
llama.cpp batch; with room for several groups of N, several prompts decode together."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from s2t_edge.candidates import Candidates, candidates
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.selector import sample_token

VOTE_TEMPERATURE = 0.7  # maj@N's sampling (with top-p 0.8, top-k 20), as self-consistency runs it


@dataclass
class _Group:
    index: int  # which prompt
    base: int  # its first sequence id; its samples are base .. base+n-1
    pos: int  # position of the next token fed (the same for every sample of the group)
    rng: np.random.Generator
    outs: list[list[int]]
    cands: dict[int, Candidates] = field(default_factory=dict)  # seq id -> its next step's candidates
    steps: int = 0
    seconds: float = 0.0


def sample_batch(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    n: int,
    *,
    max_tokens: int = 512,
    temperature: float = VOTE_TEMPERATURE,
    top_p: float = 0.8,
    top_k: int = 20,
    seeds: Sequence[int | None] | None = None,
) -> Iterator[tuple[int, list[list[int]], float]]:
    """`n` sampled continuations of every prompt; yields (prompt index, samples, seconds) as each
    prompt's samples are all done (end-of-turn tokens not included).

    The engine's sequences form groups of `n`; a prompt is prefilled once into the first sequence
    of a free group and shared with the rest; every step decodes one token for every unfinished
    sample of every group in a single batch. Each prompt has its own random generator
    (`seeds[i]`) drawn in sequence order, so its samples do not depend on which prompts share the
    batch. Seconds are the prompt's share of the batched work. The engine is reset after.
    """
    groups = engine.n_seq // n
    if groups < 1:
        raise S2TError(f"maj@{n} needs an engine with at least {n} sequences (it has {engine.n_seq})")
    if max_tokens < 1:
        raise S2TError(f"max_tokens must be at least 1, got {max_tokens}")
    seeds = list(seeds) if seeds is not None else [None] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    queue = list(range(len(prompts)))[::-1]
    free = [g * n for g in range(groups)][::-1]
    live: dict[int, _Group] = {}  # base seq id -> group
    engine.reset()
    try:
        while queue or live:
            while queue and free:
                base, i = free.pop(), queue.pop()
                t0 = time.perf_counter()
                first = candidates(engine.prefill_seq(prompts[i], base), top_k)
                engine.fork(n, base)
                grp = _Group(i, base, len(prompts[i]), np.random.default_rng(seeds[i]), [[] for _ in range(n)])
                grp.cands = {base + s: first for s in range(n)}
                grp.seconds = time.perf_counter() - t0
                live[base] = grp
            feed: list[tuple[_Group, int, int]] = []  # (group, seq id, token)
            for base, grp in list(live.items()):
                t0 = time.perf_counter()
                still = []
                for s, c in sorted(grp.cands.items()):
                    t = sample_token(c.ids, c.logits, temperature, top_p, top_k, grp.rng)
                    if not engine.is_eog(t):
                        grp.outs[s - base].append(t)
                        still.append((s, t))
                grp.steps += 1
                grp.seconds += time.perf_counter() - t0
                if still and grp.steps < max_tokens and grp.pos < engine.n_ctx_seq:
                    feed += [(grp, s, t) for s, t in still]
                    continue
                del live[base]
                for s in range(base, base + n):
                    engine.drop_seq(s)
                free.append(base)
                yield grp.index, grp.outs, grp.seconds
            if not feed:
                continue
            t0 = time.perf_counter()
            rows = engine.step_many([t for _, _, t in feed], [s for _, s, _ in feed], [g.pos for g, _, _ in feed])
            for grp in live.values():  # every group still live fed its unfinished samples
                grp.cands = {}
                grp.pos += 1
            for (grp, s, _), row in zip(feed, rows):
                grp.cands[s] = candidates(row, top_k)
            share = (time.perf_counter() - t0) / len(feed)  # the batched step and its top-K, per sample
            for grp, _, _ in feed:
                grp.seconds += share
    finally:
        engine.reset()


def sample_parallel(
    engine: Engine,
    prompt: Sequence[int],
    n: int,
    *,
    max_tokens: int = 512,
    temperature: float = VOTE_TEMPERATURE,
    top_p: float = 0.8,
    top_k: int = 20,
    seed: int | None = None,
) -> list[list[int]]:
    """`n` sampled continuations of one prompt, as one batch of `n` sequences (see `sample_batch`)."""
    kw = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    ((_, samples, _),) = sample_batch(engine, [prompt], n, seeds=[seed], **kw)  # runs it to the end
    return samples
