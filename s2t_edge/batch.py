"""Continuous batching for offline work: many prompts decoded together, one llama.cpp batch per step.

Each prompt gets a slot (a sequence of the engine); every step decodes one token for every active
slot in a single `llama_decode`, and a finished slot takes the next prompt. On a CPU this turns
the memory-bound one-token matrix-vector products into small matrix products (several times the
throughput). Trigger and selector run per slot exactly as in `decode()`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from s2t_edge.candidates import Candidates, Step, candidates
from s2t_edge.decode import DecodeStats
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.policy import Policy
from s2t_edge.teacher import TeacherSelector, teacher_choice
from s2t_edge.trigger import Always


@dataclass
class _Slot:
    index: int  # which prompt
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)


def decode_batch(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    policy: Policy,
    *,
    max_tokens: int = 512,
) -> Iterator[tuple[int, list[int], DecodeStats]]:
    """Decode every prompt with `policy`; yields (prompt index, generated ids, stats) as each ends.

    Up to `engine.n_seq` prompts run at once. Results match `decode()` up to floating-point
    reordering inside llama.cpp's batched kernels. Trigger and selector objects are shared by the
    slots, so they must not keep state between steps (greedy and s2t-local do not).

    Teacher policies (s2t / takeover, trigger "always") run the teacher as a second batch in
    lockstep: the same sequence ids, fed the same accepted tokens.
    """
    if policy.needs_hidden and not engine.hidden_enabled:
        raise S2TError(f"policy {policy.name} needs an engine built with hidden=True")
    teacher = policy.selector.teacher if isinstance(policy.selector, TeacherSelector) else None
    if teacher is not None:
        if not isinstance(policy.trigger, Always):
            raise S2TError(f"batched {policy.name} supports --trigger always only (use --batch 1)")
        if teacher.n_seq < engine.n_seq or teacher.n_ctx_seq < engine.n_ctx_seq:
            raise S2TError("the teacher needs as many sequences and as much context per sequence as the SLM")
        teacher.reset()
    k = policy.k
    queue = list(range(len(prompts)))[::-1]
    free = list(range(engine.n_seq))[::-1]
    active: dict[int, _Slot] = {}  # seq id -> slot
    nxt: dict[int, tuple[Candidates, np.ndarray | None]] = {}  # seq id -> its next step's inputs
    picks: dict[int, int] = {}  # seq id -> the teacher's choice at its next step
    engine.reset()
    try:
        while queue or active:
            while queue and free:  # fill free slots; prompts are prefilled one at a time
                seq, i = free.pop(), queue.pop()
                slot = _Slot(i, list(prompts[i]))
                slot.stats.prompt_tokens = len(slot.prompt)
                slot.stats.finish_reason = "length"
                t0 = time.perf_counter()
                cands = candidates(engine.prefill_seq(slot.prompt, seq), k)
                nxt[seq] = (cands, engine.hidden.copy() if engine.hidden_enabled else None)
                if teacher is not None:
                    picks[seq] = teacher_choice(teacher.prefill_seq(slot.prompt, seq), cands.ids, policy.selector.mode)
                dt = time.perf_counter() - t0
                slot.stats.model_s += dt
                slot.stats.prefill_s += dt
                active[seq] = slot
            t0 = time.perf_counter()
            feed: list[tuple[int, int]] = []
            finished: list[_Slot] = []
            for seq, slot in list(active.items()):
                cands, hidden = nxt.pop(seq)
                step = Step(slot.prompt + slot.out, len(slot.prompt), cands, hidden)
                if teacher is not None:
                    fired, token = True, picks.pop(seq)
                else:
                    fired = policy.trigger.fires(step)
                    token = policy.selector.select(step) if fired else int(cands.ids[0])
                st = slot.stats
                st.count(fired, token != int(cands.ids[0]))
                if engine.is_eog(token):
                    st.finish_reason, st.stop_token = "stop", token
                else:
                    slot.out.append(token)
                    n = len(slot.prompt) + len(slot.out)
                    if len(slot.out) < max_tokens and n <= engine.n_ctx_seq:
                        feed.append((seq, token))
                        continue
                # finished: end of turn, max tokens or context full (finish_reason "length")
                del active[seq]
                engine.drop_seq(seq)
                if teacher is not None:
                    teacher.drop_seq(seq)
                free.append(seq)
                finished.append(slot)
            t1 = time.perf_counter()
            for seq, _ in feed:
                active[seq].stats.ours_s += (t1 - t0) / (len(feed) + len(finished))
            if feed:
                seqs = [s for s, _ in feed]
                positions = [len(active[s].prompt) + len(active[s].out) - 1 for s in seqs]
                logits_rows = engine.step_many([t for _, t in feed], seqs, positions)
                for j, s in enumerate(seqs):
                    hidden = engine.hidden_rows[j].copy() if engine.hidden_enabled else None
                    nxt[s] = (candidates(logits_rows[j], k), hidden)
                if teacher is not None:
                    t_rows = teacher.step_many([t for _, t in feed], seqs, positions)
                    for j, s in enumerate(seqs):
                        picks[s] = teacher_choice(t_rows[j], nxt[s][0].ids, policy.selector.mode)
                t2 = time.perf_counter()
                for s in seqs:  # wall time of the batched decode is shared by its sequences
                    active[s].stats.model_s += (t2 - t1) / len(seqs)
            for slot in finished:
                yield slot.index, slot.out, slot.stats
    finally:
        engine.reset()
        if teacher is not None:
            teacher.reset()
