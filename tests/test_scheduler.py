"""`BatchScheduler`, the step-wise core of `decode_batch` and `serve`: joining between steps,
cancelling, and a policy per slot, each slot equal to the decode loop on its own prompt."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from s2t_edge.batch import MIN_SHARED, BatchScheduler, decode_batch
from s2t_edge.decode import decode
from s2t_edge.engine import Engine, reusable_prefix
from s2t_edge.policy import greedy
from s2t_edge.runtime import build_policy, open_models
from tests.test_batch import prompts, sequential
from tests.test_runtime_policy import MAX_TOKENS, open_tiny, run


def drain(sched: BatchScheduler, out: dict[Hashable, list[int]], flips: dict[Hashable, int] | None = None) -> None:
    """Step until every slot is done: each slot's tokens into `out` (and its flips into `flips`)."""
    while sched.active:
        for ev in sched.step():
            if ev.done:
                out[ev.key] = list(ev.out)
                if flips is not None:
                    flips[ev.key] = ev.stats.flips


def test_a_prompt_added_between_steps_joins_at_the_next_one(tiny_gguf: Path) -> None:
    ref = sequential(tiny_gguf, 10)
    with Engine(tiny_gguf, n_ctx=3 * 256, n_threads=1, n_seq=3) as e:
        ps = prompts(e)
        sched = BatchScheduler(e, greedy())
        a = sched.add(ps[0], key=0, max_tokens=10)
        first = sched.step()  # the first token comes straight after the prefill
        assert [(ev.seq, ev.done) for ev in first] == [(a, False)] and first[0].token == ref[0][0]
        sched.step()
        sched.add(ps[1], key=1, max_tokens=10)
        joined = sched.step()
        assert sorted(ev.key for ev in joined) == [0, 1]  # both in the same step now
        assert sched.free_slots == 1
        out: dict[int, list[int]] = {}
        drain(sched, out)
        assert sched.free_slots == 3
        sched.close()
        assert e.n_past == 0
    assert out == {0: ref[0], 1: ref[1]}


def test_cancel_frees_the_slot_for_the_next_prompt(tiny_gguf: Path) -> None:
    ref = sequential(tiny_gguf, 10)
    with Engine(tiny_gguf, n_ctx=256, n_threads=1, n_seq=1) as e:
        ps = prompts(e)
        sched = BatchScheduler(e, greedy())
        seq = sched.add(ps[0], key=0, max_tokens=10)
        sched.step()
        assert sched.free_slots == 0
        sched.cancel(seq)
        assert sched.free_slots == 1 and not sched.active
        sched.add(ps[2], key=2, max_tokens=10)
        out: dict[int, list[int]] = {}
        drain(sched, out)
    assert out == {2: ref[2]}  # nothing of the cancelled prompt leaked into the cache


def test_each_slot_runs_its_own_policy(tiny_gguf: Path, always_bundle: Path) -> None:
    one = open_tiny(tiny_gguf, always_bundle)
    try:
        local = build_policy(one, "s2t-local")
        ps = prompts(one.slm)
        ref_local, st_local = run(one.slm, ps[0], **local.decode_args())
        ref_greedy, _ = run(one.slm, ps[1], **greedy().decode_args())
    finally:
        one.close()
    models = open_tiny(tiny_gguf, always_bundle, n_seq=2)
    try:
        sched = BatchScheduler(models.slm, build_policy(models, "s2t-local"))
        sched.add(ps[0], key="local", max_tokens=10)
        sched.add(ps[1], key="greedy", max_tokens=10, policy=greedy())
        out: dict[str, list[int]] = {}
        flips: dict[str, int] = {}
        drain(sched, out, flips)
    finally:
        models.close()
    assert out == {"local": ref_local, "greedy": ref_greedy}
    assert flips == {"local": st_local.flips, "greedy": 0} and st_local.flips > 0


@pytest.mark.parametrize("unified", [True, False])  # cells shared, or the whole sequence's cache copied
def test_a_copied_prefill_decodes_as_its_own_would(tiny_gguf: Path, always_bundle: Path, unified: bool) -> None:
    one = open_tiny(tiny_gguf, always_bundle)
    try:
        ps = prompts(one.slm)
        ref, st = run(one.slm, ps[0], **build_policy(one, "s2t-local").decode_args())
    finally:
        one.close()
    models = open_tiny(tiny_gguf, always_bundle, n_seq=3, unified=unified)
    try:
        e = models.slm
        with mock.patch.object(e, "prefill_seq", wraps=e.prefill_seq) as prefill:
            sched = BatchScheduler(e, build_policy(models, "s2t-local"))
            a = sched.add(ps[0], key="a", max_tokens=MAX_TOKENS)
            sched.add(ps[0], key="b", max_tokens=MAX_TOKENS, like=a)  # copied: hidden state and candidates too
            assert [call.args[1] for call in prefill.call_args_list] == [a]
            sched.step()
            c = sched.add(ps[0], key="c", max_tokens=MAX_TOKENS, like=a)  # `a` has stepped: prefilled again
            assert [call.args[1] for call in prefill.call_args_list] == [a, c]
            out: dict[Hashable, list[int]] = {}
            flips: dict[Hashable, int] = {}
            drain(sched, out, flips)
    finally:
        models.close()
    assert out == {"a": ref, "b": ref, "c": ref}
    assert flips == {"a": st.flips, "b": st.flips, "c": st.flips} and st.flips > 0


def test_a_copied_prefill_copies_the_teachers_cache_too(tiny_gguf: Path, tiny_teacher_gguf: Path) -> None:
    kw = {"bundle": "none", "teacher": str(tiny_teacher_gguf), "ctx": 256, "threads": 1}
    one = open_models(str(tiny_gguf), **kw)
    try:
        ps = prompts(one.slm)
        refs = [run(one.slm, p, **build_policy(one, "s2t").decode_args()) for p in ps]
    finally:
        one.close()
    i = max(range(len(ps)), key=lambda j: refs[j][1].flips)  # a prompt where the teacher changes tokens
    assert refs[i][1].flips > 0
    two = open_models(str(tiny_gguf), n_seq=2, teacher_seq=2, **kw)
    try:
        sched = BatchScheduler(two.slm, build_policy(two, "s2t"))
        with mock.patch.object(two.teacher, "prefill_seq", wraps=two.teacher.prefill_seq) as prefill:
            a = sched.add(ps[i], key="a", max_tokens=MAX_TOKENS)
            sched.add(ps[i], key="b", max_tokens=MAX_TOKENS, like=a)
            assert prefill.call_count == 1
        out: dict[Hashable, list[int]] = {}
        flips: dict[Hashable, int] = {}
        drain(sched, out, flips)
    finally:
        two.close()
    assert out == {"a": refs[i][0], "b": refs[i][0]} and flips == {"a": refs[i][1].flips, "b": refs[i][1].flips}


@pytest.mark.parametrize("unified", [True, False])
def test_a_shared_system_prompt_is_copied_not_prefilled_again(tiny_gguf: Path, unified: bool) -> None:
    """Prompts that start alike (a system prompt) prefill that start once; each slot still decodes
    as it would alone, and says how many of its prompt tokens were copied."""
    with Engine(tiny_gguf, n_ctx=512, n_threads=1) as e:
        system = e.tokenize("<|im_start|>system\nYou are a careful assistant. Think step by step.<|im_end|>\n")
        ps = [system + p for p in prompts(e)[:3]]
        ref = [[t.id for t in decode(e, p, max_tokens=10)] for p in ps]
    assert len(system) >= MIN_SHARED
    with Engine(tiny_gguf, n_ctx=3 * 256, n_threads=1, n_seq=3, unified=unified) as e:
        with mock.patch.object(e, "prefill_seq", wraps=e.prefill_seq) as prefill:
            got = {i: (ids, st) for i, ids, st in decode_batch(e, ps, greedy(), max_tokens=10)}
    assert [got[i][0] for i in range(3)] == ref
    shared = reusable_prefix(ps[0], ps[1])  # the system prompt and the user turn's opening
    assert shared >= len(system)
    assert [got[i][1].cached_tokens for i in range(3)] == [0, shared, shared]
    assert [c.kwargs["reuse"] for c in prefill.call_args_list] == [None, (0, shared), (0, shared)]
    with Engine(tiny_gguf, n_ctx=3 * 256, n_threads=1, n_seq=3, unified=unified) as e:
        e.partial_reuse = False  # as for a sliding-window or recurrent model: every prompt prefilled whole
        got = {i: (ids, st) for i, ids, st in decode_batch(e, ps, greedy(), max_tokens=10)}
        with pytest.raises(ValueError, match="cannot keep part"):
            e.prefill_seq(ps[1], 1, reuse=(0, shared))
    assert [got[i][0] for i in range(3)] == ref and [got[i][1].cached_tokens for i in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("unified", [True, False])
def test_a_freed_slot_keeps_its_cells_for_a_prompt_that_starts_like_it(tiny_gguf: Path, unified: bool) -> None:
    """A finished slot's prompt and answer stay cached: a prompt starting with them keeps those
    cells (a chat's next turn); when a running slot shares more, its cells are copied instead."""
    with Engine(tiny_gguf, n_ctx=512, n_threads=1) as e:
        system = e.tokenize("<|im_start|>system\nYou are a careful assistant. Think step by step.<|im_end|>\n")
        more = e.tokenize("<|im_start|>user\nHere is a long shared context for two of the questions.")
        q = prompts(e)
        turn1, other = system + q[0], system + q[4]
        first = [t.id for t in decode(e, turn1, max_tokens=6)]
        turn2 = turn1 + first + q[1]  # the next turn starts with the first turn and its answer
        a, b = system + more + q[2], system + more + q[3]
        ref = {k: [t.id for t in decode(e, p, max_tokens=6)] for k, p in (("turn2", turn2), ("a", a), ("b", b))}
        e.reset()
        ref_first = {k: e.load(p).copy() for k, p in (("turn2", turn2), ("b", b))}  # the prompts' last logits
    first_logits: dict[Hashable, np.ndarray] = {}
    with Engine(tiny_gguf, n_ctx=2 * 256, n_threads=1, n_seq=2, unified=unified) as e:
        sched = BatchScheduler(e, greedy(), on_logits=lambda k, row: first_logits.setdefault(k, row.copy()))
        one = sched.add(turn1, key="turn1", max_tokens=6)
        sched.add(other, key="other", max_tokens=6)
        out: dict[Hashable, list[int]] = {}
        drain(sched, out)  # both slots free, both holding their cells
        assert out["turn1"] == first
        s = sched.add(turn2, key="turn2", max_tokens=6)
        assert s == one and sched.active[s].stats.cached_tokens == len(turn1) + len(first) - 1
        drain(sched, out)
        sched.add(a, key="a", max_tokens=6)  # a free slot's system prompt kept
        sb = sched.add(b, key="b", max_tokens=6)  # its slot's system prompt dropped: running `a` shares more
        assert sched.active[sb].stats.cached_tokens == reusable_prefix(a, b) > reusable_prefix(other, b)
        drain(sched, out)
    assert {k: out[k] for k in ref} == ref
    # a prompt prefilled in parts differs from a whole prefill by ≈ 2e-3 here (as decoding it token by
    # token does); a cell left over from the slot's last prompt moves these by ≈ 0.2
    for k, row in ref_first.items():
        np.testing.assert_allclose(first_logits[k], row, atol=1e-2)


def test_a_shared_start_is_copied_in_the_teachers_cache_too(tiny_gguf: Path, tiny_teacher_gguf: Path) -> None:
    """With the teacher in lockstep, both caches copy the shared start: s2t decodes as alone."""
    kw = {"bundle": "none", "teacher": str(tiny_teacher_gguf), "ctx": 256, "threads": 1}
    one = open_models(str(tiny_gguf), **kw)
    try:
        system = one.slm.tokenize("<|im_start|>system\nYou are a careful assistant. Think step by step.<|im_end|>\n")
        ps = [system + p for p in prompts(one.slm)[:3]]
        refs = [run(one.slm, p, **build_policy(one, "s2t").decode_args()) for p in ps]
    finally:
        one.close()
    assert sum(st.flips for _, st in refs) > 0  # the teacher's choices matter
    two = open_models(str(tiny_gguf), n_seq=2, teacher_seq=2, **kw)
    try:
        with mock.patch.object(two.teacher, "prefill_seq", wraps=two.teacher.prefill_seq) as prefill:
            batch = decode_batch(two.slm, ps, build_policy(two, "s2t"), max_tokens=MAX_TOKENS)
            got = {i: (ids, st) for i, ids, st in batch}
        assert [c.kwargs["reuse"] is not None for c in prefill.call_args_list] == [False, True, True]
    finally:
        two.close()
    assert [got[i][0] for i in range(3)] == [r[0] for r in refs]
    assert [got[i][1].flips for i in range(3)] == [r[1].flips for r in refs]
    assert all(got[i][1].cached_tokens >= len(system) for i in (1, 2))


def test_an_unrelated_prompt_takes_an_empty_slot_not_a_warm_one(tiny_gguf: Path) -> None:
    """A finished chat's cells survive a prompt that does not start like them while an empty
    slot is free; once the queue of decode_batch is empty, freed cells go back to the pool."""
    with Engine(tiny_gguf, n_ctx=512, n_threads=1) as e:
        system = e.tokenize("<|im_start|>system\nYou are a careful assistant. Think step by step.<|im_end|>\n")
        q = prompts(e)
        turn1 = system + q[0]
    with Engine(tiny_gguf, n_ctx=2 * 256, n_threads=1, n_seq=2, unified=False) as e:
        sched = BatchScheduler(e, greedy())
        one = sched.add(turn1, key="turn1", max_tokens=6)
        out: dict[Hashable, list[int]] = {}
        drain(sched, out)
        other = sched.add(q[1], key="other", max_tokens=6)  # shares nothing with turn1
        assert other != one and sched.active[other].stats.cached_tokens == 0
        nxt = sched.add(turn1 + out["turn1"] + q[2], key="turn2", max_tokens=6)
        assert nxt == one and sched.active[nxt].stats.cached_tokens == len(turn1) + len(out["turn1"]) - 1
        drain(sched, out)
        with mock.patch.object(BatchScheduler, "forget", autospec=True) as forget:
            list(decode_batch(e, [system + p for p in q[:3]], greedy(), max_tokens=4))
        assert forget.call_count == 1  # when the third and last prompt went in


def test_load_extends_without_cutting_when_the_cache_cannot_be_cut(tiny_gguf: Path) -> None:
    """With a sliding window or a recurrent state a plain extension still decodes only what is new;
    anything that would cut the cached tokens prefills from the start."""
    with Engine(tiny_gguf, n_ctx=256, n_threads=1) as e:
        e.partial_reuse = False
        ids = prompts(e)[0]
        with mock.patch.object(e, "prefill", wraps=e.prefill) as prefill:
            e.load(ids[:5])
            e.load(ids)  # extends
            e.load(ids[:3] + ids[4:])  # differs at 3: would need a cut
        assert [len(c.args[0]) for c in prefill.call_args_list] == [5, len(ids) - 5, len(ids) - 1]
