"""Continuous batching: many prompts decoded together, one llama.cpp batch per step.

Each prompt gets a slot (a sequence of the engine); every step decodes one token for every active
slot in a single `llama_decode`, and a finished slot takes the next prompt. On a CPU this turns
the memory-bound one-token matrix-vector products into small matrix products (several times the
throughput). Trigger and selector run per slot exactly as in `decode()`. A prompt that starts
like a running slot's (the system prompt every GSM8K problem or chat request shares) copies those
cells from it, and a freed slot keeps its cells for a prompt that starts like them (a chat's next
turn): only the rest is prefilled.

`BatchScheduler` is the step-wise core (`add` a prompt into a free slot, `step` all slots once,
`cancel` a slot): `decode_batch()` drives it for offline work, `s2t-edge serve` for live requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from s2t_edge.candidates import Candidates, Step, candidates
from s2t_edge.decode import DecodeStats
from s2t_edge.engine import Engine, reusable_prefix
from s2t_edge.errors import S2TError
from s2t_edge.policy import Policy
from s2t_edge.teacher import TeacherSelector, teacher_choice
from s2t_edge.trigger import Always


@dataclass
class _Slot:
    key: Hashable  # the caller's name for this prompt (decode_batch: its index)
    prompt: list[int]
    policy: Policy
    max_tokens: int
    limit: int  # positions this sequence may fill
    out: list[int] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)
    nxt: tuple[Candidates, np.ndarray | None] | None = None  # the next step's inputs
    pick: int | None = None  # the teacher's choice at the next step


MIN_SHARED = 16  # tokens: below this a prompt is prefilled whole rather than copied from another slot


def _longest_start(held: Iterable[tuple[int, list[int]]], prompt: list[int]) -> tuple[int | None, int]:
    """Of (seq id, tokens its cells hold) pairs, the one whose tokens start like `prompt` for
    longest, and how many tokens (below the whole prompt); (None, 0) if none shares a token."""
    best, n = None, 0
    for s, tokens in held:
        m = reusable_prefix(tokens, prompt)
        if m > n:
            best, n = s, m
    return best, n


def _same_start(src: _Slot, slot: _Slot) -> bool:
    """Whether `slot` starts where `src` stands: the same prompt, nothing decoded past it, the
    same K (so the same first candidates)."""
    return src.nxt is not None and not src.out and src.prompt == slot.prompt and src.policy.k == slot.policy.k


@dataclass(frozen=True)
class SlotToken:
    """What one slot did in one `step()`: its token (None when an end-of-generation token ended
    it; that token is in `stats.stop_token`), whether the trigger fired and the token differs
    from the SLM's top-1, and whether the slot is done (then it is already free)."""

    seq: int
    key: Hashable
    token: int | None
    fired: bool
    flipped: bool
    done: bool
    out: list[int]  # every token generated so far (the slot's own list)
    stats: DecodeStats


class BatchScheduler:
    """A step-wise continuous batch over `engine.n_seq` slots.

    `add()` prefills a prompt into a free slot; `step()` chooses one token for every active slot
    (from the logits of the previous decode), then the next `step()` decodes all the continuing
    slots in one `llama_decode` before choosing again. So a slot's first token comes straight
    after its prefill, and a slot added between two steps joins the batch at the next one.

    Each slot may carry its own policy (e.g. greedy next to s2t-local, or a seeded sampler);
    policy objects shared by several slots must not keep state between steps (greedy and
    s2t-local do not). A teacher policy (s2t / takeover, trigger "always") is the scheduler's
    only: the teacher runs as a second batch in lockstep, same sequence ids, same accepted tokens.
    """

    def __init__(
        self, engine: Engine, policy: Policy, *, on_logits: Callable[[Hashable, np.ndarray], None] | None = None
    ) -> None:
        self._check(engine, policy)
        self.engine, self.policy, self.on_logits = engine, policy, on_logits
        self.teacher = policy.selector.teacher if isinstance(policy.selector, TeacherSelector) else None
        if self.teacher is not None:
            if not isinstance(policy.trigger, Always):
                raise S2TError(f"batched {policy.name} supports --trigger always only (use --batch 1)")
            if self.teacher.n_seq < engine.n_seq or self.teacher.n_ctx_seq < engine.n_ctx_seq:
                raise S2TError("the teacher needs as many sequences and as much context per sequence as the SLM")
            self.teacher.reset()
        self.active: dict[int, _Slot] = {}  # seq id -> slot
        self._free = list(range(engine.n_seq))[::-1]
        self._warm: dict[int, list[int]] = {}  # free seq id -> the tokens its cells still hold
        self._reuse = engine.partial_reuse and (self.teacher is None or self.teacher.partial_reuse)
        self._keep = True  # a freed slot keeps its cells for a prompt that starts like them
        self._feed: dict[int, int] = {}  # seq id -> the token chosen at the last step, not yet decoded
        engine.reset()

    @staticmethod
    def _check(engine: Engine, policy: Policy) -> None:
        if policy.needs_hidden and not engine.hidden_enabled:
            raise S2TError(f"policy {policy.name} needs an engine built with hidden=True")

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def add(
        self,
        prompt: Sequence[int],
        *,
        key: Hashable = None,
        max_tokens: int = 512,
        policy: Policy | None = None,
        limit: int | None = None,
        like: int | None = None,
    ) -> int:
        """Prefill `prompt` into a free slot and return its sequence id; its first token comes
        with the next `step()`. `policy` overrides the scheduler's for this slot (not with a
        teacher); `limit` caps the positions it may fill (default: the engine's per sequence).
        `like` names a slot that may hold the same prompt: if it does, has not stepped yet and
        shows the same K (and no `on_logits` callback is set), its cache is copied instead of
        prefilled again (a request's n choices prefill once); otherwise it is ignored."""
        if not self._free:
            raise S2TError("no free slot in the batch")
        if policy is not None and policy is not self.policy:
            if self.teacher is not None or isinstance(policy.selector, TeacherSelector):
                raise S2TError("a teacher policy cannot be mixed with other policies in one batch")
            self._check(self.engine, policy)
        seq_limit = min(limit or self.engine.n_ctx_seq, self.engine.n_ctx_seq)
        if len(prompt) > seq_limit:
            raise S2TError(f"context overflow: a {len(prompt)}-token prompt > {seq_limit} per sequence")
        slot = _Slot(key, list(prompt), policy or self.policy, max_tokens, seq_limit)
        slot.stats.prompt_tokens = len(slot.prompt)
        slot.stats.finish_reason = "length"
        src = self.active.get(like) if like is not None and self.on_logits is None else None
        copy = src is not None and _same_start(src, slot)
        seq, kept = self._take_free(None if copy else slot.prompt)
        self.active[seq] = slot
        t0 = time.perf_counter()
        try:
            if copy:
                self._copy(like, src, seq, slot)
            else:
                reuse = self._shared_start(seq, slot.prompt)
                if kept and (reuse is None or kept >= reuse[1]):
                    reuse = (seq, kept)  # its own cells from the last prompt it held: nothing to copy
                elif kept:
                    self._drop(seq)  # another slot shares more: copy that instead
                self._take(seq, self.engine.prefill_seq(slot.prompt, seq, reuse=reuse), self.engine.hidden)
                if self.teacher is not None:
                    self._teach(seq, self.teacher.prefill_seq(slot.prompt, seq, reuse=reuse))
                slot.stats.cached_tokens = reuse[1] if reuse else 0
        except BaseException:
            self._release(seq, keep=False)  # a failed prefill leaves the slot free and its cells dropped
            raise
        dt = time.perf_counter() - t0
        slot.stats.model_s += dt
        slot.stats.prefill_s += dt
        return seq

    def _take_free(self, prompt: list[int] | None) -> tuple[int, int]:
        """A free slot for `prompt`, and how many of its leading tokens that slot still holds: the
        free slot whose last prompt and answer start like it for longest (a chat's next turn), if
        at least MIN_SHARED; otherwise an empty slot, or else the one freed longest ago, its old
        cells dropped. `prompt=None`: the slot's cells are not wanted (a copy will fill it)."""
        held = [(s, self._warm[s]) for s in self._free if s in self._warm] if prompt is not None else []
        best, n = _longest_start(held, prompt)
        if best is not None and n >= MIN_SHARED:
            self._free.remove(best)
            del self._warm[best]
            return best, n
        empty = [s for s in self._free if s not in self._warm]
        seq = empty[-1] if empty else self._free[0]  # _free is in release order, the next id last
        self._free.remove(seq)
        if self._warm.pop(seq, None) is not None:
            self._drop(seq)
        return seq, 0

    def forget(self) -> None:
        """Drop the cells free slots hold and keep none from now on (no prompt is coming that
        would start like them): the running slots get the cells back."""
        self._keep = False
        for seq in list(self._warm):
            del self._warm[seq]
            self._drop(seq)

    def _shared_start(self, seq: int, prompt: list[int]) -> tuple[int, int] | None:
        """The active slot whose prompt starts like `prompt` for longest (a system prompt, an
        earlier chat turn) and that length, kept below the whole prompt so its last token is
        decoded; None under MIN_SHARED tokens, where copying a sequence's cache is not worth it."""
        if not self._reuse:
            return None
        best, n = _longest_start(((s, other.prompt) for s, other in self.active.items() if s != seq), prompt)
        return (best, n) if best is not None and n >= MIN_SHARED else None

    def _copy(self, src_seq: int, src: _Slot, seq: int, slot: _Slot) -> None:
        """Start `slot` from `src`'s prefill: its cache (and the teacher's), first candidates
        (never mutated, so shared), hidden state (a copy) and the teacher's first pick."""
        self.engine.copy_seq(src_seq, seq)
        slot.stats.cached_tokens = len(slot.prompt)
        cands, hidden = src.nxt
        slot.nxt = (cands, None if hidden is None else hidden.copy())
        if self.teacher is not None:
            self.teacher.copy_seq(src_seq, seq)
            slot.pick = src.pick

    def _take(self, seq: int, logits: np.ndarray, hidden: np.ndarray | None) -> None:
        """Keep what the slot's next step needs out of this decode's (reused) buffers."""
        slot = self.active[seq]
        if self.on_logits is not None:
            self.on_logits(slot.key, logits)
        slot.nxt = (candidates(logits, slot.policy.k), hidden.copy() if self.engine.hidden_enabled else None)

    def _teach(self, seq: int, teacher_logits: np.ndarray) -> None:
        slot = self.active[seq]
        slot.pick = teacher_choice(teacher_logits, slot.nxt[0].ids, self.policy.selector.mode)

    def _decode_feed(self) -> None:
        """One llama_decode for the tokens chosen at the last step (and one for the teacher)."""
        seqs = list(self._feed)
        tokens = [self._feed[s] for s in seqs]
        self._feed.clear()
        positions = [len(self.active[s].prompt) + len(self.active[s].out) - 1 for s in seqs]
        t0 = time.perf_counter()
        rows = self.engine.step_many(tokens, seqs, positions)
        for j, s in enumerate(seqs):
            self._take(s, rows[j], self.engine.hidden_rows[j] if self.engine.hidden_enabled else None)
        if self.teacher is not None:
            for j, t_row in enumerate(self.teacher.step_many(tokens, seqs, positions)):
                self._teach(seqs[j], t_row)
        dt = (time.perf_counter() - t0) / len(seqs)
        for s in seqs:  # wall time of the batched decode is shared by its sequences
            self.active[s].stats.model_s += dt

    def step(self) -> list[SlotToken]:
        """Decode the tokens chosen last time (one batch), then choose each active slot's next
        token. A slot that ends (end of turn, max tokens, context full) is freed at once."""
        if self._feed:
            self._decode_feed()
        events: list[SlotToken] = []
        for seq, slot in list(self.active.items()):
            t0 = time.perf_counter()
            cands, hidden = slot.nxt
            slot.nxt = None
            step = Step(slot.prompt + slot.out, len(slot.prompt), cands, hidden)
            if self.teacher is not None:
                fired, token = True, slot.pick
            else:
                fired = slot.policy.trigger.fires(step)
                token = slot.policy.selector.select(step) if fired else int(cands.ids[0])
            flipped = token != int(cands.ids[0])
            st = slot.stats
            st.count(fired, flipped)
            done = True
            if self.engine.is_eog(token):
                st.finish_reason, st.stop_token = "stop", token
                emitted = None
            else:
                slot.out.append(token)
                emitted = token
                # otherwise finished: max tokens or context full (finish_reason "length")
                if len(slot.out) < slot.max_tokens and len(slot.prompt) + len(slot.out) <= slot.limit:
                    self._feed[seq] = token
                    done = False
            if done:
                self._release(seq)
            st.ours_s += time.perf_counter() - t0
            events.append(SlotToken(seq, slot.key, emitted, fired, flipped, done, slot.out, st))
        return events

    def _release(self, seq: int, keep: bool = True) -> None:
        """Free the slot; its cells stay (until the slot is taken) for a prompt that starts with
        its prompt and answer. Every token but the last was decoded; the last may not have been."""
        slot = self.active.pop(seq)
        self._feed.pop(seq, None)
        if keep and self._keep and self._reuse:
            self._warm[seq] = slot.prompt + slot.out[:-1]
        else:
            self._drop(seq)
        self._free.append(seq)

    def _drop(self, seq: int) -> None:
        self.engine.drop_seq(seq)
        if self.teacher is not None:
            self.teacher.drop_seq(seq)

    def cancel(self, seq: int) -> None:
        """End a slot now (e.g. its client went away) and free it for the next prompt."""
        if seq in self.active:
            self._release(seq)

    def close(self) -> None:
        """Drop every slot and clear the caches."""
        self.active.clear()
        self._feed.clear()
        self._free = list(range(self.engine.n_seq))[::-1]
        self._warm.clear()
        self._keep = True
        self.engine.reset()
        if self.teacher is not None:
            self.teacher.reset()


def decode_batch(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    policy: Policy,
    *,
    max_tokens: int | Sequence[int] = 512,
    on_logits: Callable[[int, np.ndarray], None] | None = None,
) -> Iterator[tuple[int, list[int], DecodeStats]]:
    """Decode every prompt with `policy`; yields (prompt index, generated ids, stats) as each ends.
    `max_tokens` is one budget for all, or one per prompt.

    Up to `engine.n_seq` prompts run at once. Results match `decode()` up to floating-point
    reordering inside llama.cpp's batched kernels. Trigger and selector objects are shared by the
    slots, so they must not keep state between steps (greedy and s2t-local do not).

    `on_logits(prompt index, logits)`, when given, sees every step's full logits row (a view valid
    only during the call) before the step's token is chosen: one call per counted step.

    Teacher policies (s2t / takeover, trigger "always") run the teacher as a second batch in
    lockstep: the same sequence ids, fed the same accepted tokens.
    """
    budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(budgets) != len(prompts):
        raise S2TError(f"{len(budgets)} token budgets for {len(prompts)} prompts")
    sched = BatchScheduler(engine, policy, on_logits=on_logits)
    queue = list(range(len(prompts)))[::-1]
    try:
        while queue or sched.active:
            while queue and sched.free_slots:  # fill free slots; prompts are prefilled one at a time
                i = queue.pop()
                sched.add(prompts[i], key=i, max_tokens=budgets[i])
                if not queue:  # the last prompt is in: give freed cells back to the running slots
                    sched.forget()
            for ev in sched.step():
                if ev.done:
                    yield ev.key, ev.out, ev.stats
    finally:
        sched.close()
