"""The teacher side of S2T on the tiny SLM/teacher pair: scoring, selection, KL trigger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from s2t_edge.candidates import Step, candidates
from s2t_edge.decode import DecodeStats, decode
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.teacher import (
    KLTrigger,
    TeacherSelector,
    check_same_vocab,
    kl_on_support,
    log_softmax,
    teacher_view,
)
from s2t_edge.trigger import Always

TEXT = "Hello world, the answer is 42. Let us think step by step."
ATOL = 1e-4
K = 8


@pytest.fixture(scope="module")
def slm(tiny_gguf: Path) -> Engine:
    return Engine(tiny_gguf, n_ctx=256, n_threads=1)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_gguf: Path) -> Engine:
    return Engine(tiny_teacher_gguf, n_ctx=256, n_threads=1)


def step_at(slm: Engine, context: list[int], k: int = K) -> Step:
    """The Step the decode loop would build after `context`."""
    slm.reset()
    return Step(list(context), len(context), candidates(slm.load(context), k), None)


def test_same_vocab_accepted(slm: Engine, teacher: Engine) -> None:
    assert slm.n_vocab == teacher.n_vocab
    check_same_vocab(slm, teacher)  # no error


def test_other_vocab_refused(slm: Engine, tiny_other_vocab_gguf: Path) -> None:
    with Engine(tiny_other_vocab_gguf, n_ctx=64, n_threads=1) as other:
        with pytest.raises(S2TError, match="vocabulary.*differs.*shared tokenizer") as e:
            check_same_vocab(slm, other)
    msg = str(e.value)
    assert str(slm.n_vocab) in msg and str(other.n_vocab) in msg and tiny_other_vocab_gguf.name in msg


def test_s2t_picks_highest_teacher_prob_candidate(slm: Engine, teacher: Engine, tiny_teacher_gguf: Path) -> None:
    context = slm.tokenize(TEXT)
    step = step_at(slm, context)
    picked = TeacherSelector(teacher, "s2t").select(step)
    with Engine(tiny_teacher_gguf, n_ctx=256, n_threads=1) as fresh:
        probs = np.exp(log_softmax(fresh.load(context).copy()))
    on_support = probs[step.cands.ids]
    assert picked in step.cands.ids.tolist()
    assert probs[picked] == pytest.approx(on_support.max())
    assert picked == int(step.cands.ids[int(np.argmax(on_support))])


def test_takeover_picks_teacher_full_vocab_argmax(slm: Engine, teacher: Engine, tiny_teacher_gguf: Path) -> None:
    context = slm.tokenize(TEXT)
    step = step_at(slm, context, k=2)
    picked = TeacherSelector(teacher, "takeover").select(step)
    with Engine(tiny_teacher_gguf, n_ctx=256, n_threads=1) as fresh:
        assert picked == int(np.argmax(fresh.load(context)))


def test_unknown_mode_refused(teacher: Engine) -> None:
    with pytest.raises(ValueError, match="unknown teacher mode"):
        TeacherSelector(teacher, "nope")


def test_selector_caches_per_position(slm: Engine, teacher: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    step = step_at(slm, slm.tokenize(TEXT))
    sel = TeacherSelector(teacher, "s2t")
    calls = []
    real = teacher.load
    monkeypatch.setattr(teacher, "load", lambda toks: calls.append(1) or real(toks))
    a = sel.logits(step).copy()
    sel.select(step)
    KLTrigger(sel, 0.0).fires(step)
    assert len(calls) == 1
    np.testing.assert_array_equal(a, sel.logits(step))


def test_s2t_decode_counts_flips(slm: Engine, teacher: Engine, tiny_teacher_gguf: Path) -> None:
    """Decode with s2t at every step; replay the trajectory independently to check every choice."""
    prompt = slm.tokenize("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    stats = DecodeStats()
    toks = list(
        decode(slm, prompt, max_tokens=16, k=K, trigger=Always(), selector=TeacherSelector(teacher, "s2t"), stats=stats)
    )
    ids = [t.id for t in toks]
    assert stats.triggers == stats.steps and all(t.triggered for t in toks)
    # The trajectory as the loop chose it, with the end-of-turn token if it stopped on one.
    traj = ids + ([stats.stop_token] if stats.finish_reason == "stop" else [])
    assert stats.steps == len(traj)
    # Replay: SLM top-K and teacher (scored in one prefill) at each generated position.
    slm.reset()
    slm_rows = [slm.load(prompt).copy()] + [slm.step(t).copy() for t in traj[:-1]]
    with Engine(tiny_teacher_gguf, n_ctx=256, n_threads=1) as fresh:
        t_rows = [r.copy() for _, r in fresh.score(prompt + traj[:-1], len(prompt) - 1)]
    assert len(slm_rows) == len(t_rows) == len(traj)
    expected_flips = 0
    for tok, s_row, t_row in zip(traj, slm_rows, t_rows, strict=True):
        c = candidates(s_row, K)
        want = int(c.ids[int(np.argmax(t_row[c.ids]))])
        assert tok == want
        expected_flips += want != int(c.ids[0])
    assert stats.flips == expected_flips
    assert sum(t.flipped for t in toks) == expected_flips - (
        stats.finish_reason == "stop" and stats.stop_token != int(candidates(slm_rows[-1], K).ids[0])
    )
    assert expected_flips > 0  # two random models disagree somewhere: the test is not vacuous


def test_kl_trigger_fires_iff_kl_at_least_threshold(slm: Engine, teacher: Engine) -> None:
    step = step_at(slm, slm.tokenize(TEXT))
    sel = TeacherSelector(teacher, "s2t")
    p = np.exp(log_softmax(sel.logits(step))[step.cands.ids])
    kl = kl_on_support(p, step.cands.logprobs)
    assert kl > 0
    assert KLTrigger(sel, kl).fires(step)
    assert KLTrigger(sel, kl * 0.5).fires(step)
    assert KLTrigger(sel, 0.0).fires(step)
    assert not KLTrigger(sel, kl * (1 + 1e-6) + 1e-9).fires(step)
    assert not KLTrigger(sel, kl * 2).fires(step)


def test_kl_on_support() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(K).astype(np.float32)
    lp = log_softmax(logits)
    assert kl_on_support(np.exp(lp), lp) == pytest.approx(0.0, abs=1e-6)
    # unnormalised teacher mass on the support is renormalised first
    assert kl_on_support(0.3 * np.exp(lp), lp) == pytest.approx(0.0, abs=1e-6)
    other = log_softmax(rng.standard_normal(K).astype(np.float32))
    assert kl_on_support(np.exp(other), lp) > 0


def test_teacher_view() -> None:
    logits = np.array([0.0, 2.0, 1.0, -1.0, 3.0], np.float32)
    v = teacher_view(logits, np.array([1, 2]))
    probs = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(v.probs_on, probs[[1, 2]], rtol=1e-5)
    assert v.top1 == 4 and v.top1_prob == pytest.approx(probs[4], rel=1e-5)
