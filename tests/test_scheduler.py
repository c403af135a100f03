"""`BatchScheduler`, the step-wise core of `decode_batch` and `serve`: joining between steps,
cancelling, and a policy per slot, each slot equal to the decode loop on its own prompt."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from unittest import mock

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
