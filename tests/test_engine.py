"""Engine on the tiny GGUF: tokenizer, prefix reuse, steps vs prefill, hidden state, scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError

TEXT = "Hello world, the answer is 42."
ATOL = 1e-4


def make(path: Path, **kw) -> Engine:
    return Engine(path, n_ctx=256, n_threads=1, **kw)


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path) -> Engine:
    return make(tiny_gguf)


@pytest.mark.parametrize("text", [TEXT, " the answer is 42.\n\n", "héllo wörld 😀\tend"])
def test_tokenize_round_trip(engine: Engine, text: str) -> None:
    ids = engine.tokenize(text)
    assert ids and all(0 <= t < engine.n_vocab for t in ids)
    assert engine.detokenize(ids) == text


def test_special_tokens_parsed(engine: Engine) -> None:
    ids = engine.tokenize("<|im_start|>user<|im_end|>")
    assert len(ids) == 3 and engine.is_eog(ids[-1]) and not engine.is_eog(ids[0])
    assert len(engine.tokenize("<|im_end|>", special=False)) > 1


def test_load_reuses_common_prefix(tiny_gguf: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    a = engine.tokenize(TEXT)
    b = a[:5] + engine.tokenize(" and more text")
    engine.load(a)
    assert engine.n_past == len(a)
    decoded: list[int] = []
    real_decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda toks, *rest: decoded.extend(toks) or real_decode(toks, *rest))
    got = engine.load(b).copy()
    assert decoded == b[5:]  # only the new suffix went through llama_decode
    assert engine.n_past == len(b) and engine.tokens == b
    with make(tiny_gguf) as fresh:
        np.testing.assert_allclose(got, fresh.load(b), atol=ATOL)
        # a strict prefix of what is cached: re-decodes only the last token
        np.testing.assert_allclose(engine.load(b[:3]), fresh.load(b[:3]), atol=ATOL)
    assert engine.n_past == 3


def test_load_trims_stray_cells(engine: Engine) -> None:
    """A decode interrupted before `tokens` was updated must not break the next load."""
    ids = engine.tokenize(TEXT)
    engine.load(ids)
    engine._decode((5,), engine.n_past, (True,))  # in the cache, not in engine.tokens
    ref = engine.load(ids + [5, 6]).copy()
    engine.reset()
    np.testing.assert_allclose(ref, engine.load(ids + [5, 6]), atol=ATOL)


def test_step_equals_prefill(tiny_gguf: Path, engine: Engine) -> None:
    ids = engine.tokenize(TEXT)
    engine.reset()
    engine.load(ids[:3])
    for t in ids[3:]:
        stepped = engine.step(t).copy()
    with make(tiny_gguf) as fresh:
        np.testing.assert_allclose(stepped, fresh.load(ids), atol=ATOL)


def test_context_overflow(tiny_gguf: Path) -> None:
    with make(tiny_gguf) as e:
        assert e.n_ctx == 256  # capped at the model's training context
        with pytest.raises(S2TError, match="context overflow"):
            e.load(list(range(10, 10 + e.n_ctx + 1)))
        e.load(list(range(10, 10 + e.n_ctx)))
        with pytest.raises(S2TError, match="context overflow"):
            e.step(11)


def test_hidden_state(tiny_gguf: Path, engine: Engine) -> None:
    ids = engine.tokenize(TEXT)
    engine.reset()
    plain = [engine.load(ids).copy()] + [engine.step(t).copy() for t in (7, 8)]
    with make(tiny_gguf, hidden=True) as h:
        assert h.hidden is None
        with_hidden = [h.load(ids).copy()]
        states = [h.hidden.copy()]
        for t in (7, 8):
            with_hidden.append(h.step(t).copy())
            states.append(h.hidden.copy())
    for a, b in zip(plain, with_hidden, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    for s in states:
        assert s.shape == (engine.n_embd,) == (64,) and np.isfinite(s).all()
    assert not np.allclose(states[0], states[1])


@pytest.mark.parametrize("unified", [True, False])
def test_step_many_rows_follow_the_callers_order(
    tiny_gguf: Path, unified: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoded in ascending ids (one ubatch), returned as asked: shuffled == ascending, row by row."""
    n, prompts = 4, [[3, 9, 4], [3, 8], [5, 6, 7, 2], [11]]
    rows, decoded = {}, []
    for order in ([0, 1, 2, 3], [2, 0, 3, 1]):
        with Engine(tiny_gguf, n_ctx=128 * n, n_threads=1, n_seq=n, unified=unified, hidden=True) as e:
            for s, p in enumerate(prompts):
                e.prefill_seq(p, s)
            raw = e._decode
            monkeypatch.setattr(
                e, "_decode", lambda t, p, o, seq, raw=raw: (decoded.append(list(seq)), raw(t, p, o, seq))
            )
            out = e.step_many([20 + s for s in order], order, [len(prompts[s]) for s in order])
            rows[tuple(order)] = {s: (out[j].copy(), e.hidden_rows[j].copy()) for j, s in enumerate(order)}
    assert decoded == [[0, 1, 2, 3]] * 2
    a, b = rows.values()
    for s in range(n):
        np.testing.assert_allclose(a[s][0], b[s][0], atol=ATOL)
        np.testing.assert_allclose(a[s][1], b[s][1], atol=ATOL)
    assert not np.allclose(a[0][0], a[2][0])  # the rows are distinct, so a mix-up would show


@pytest.mark.parametrize("unified", [True, False])
def test_a_reused_prefix_decodes_as_a_whole_prefill(tiny_gguf: Path, unified: bool) -> None:
    """`prefill_seq(reuse=...)` copies the shared start from another sequence and drops the rest of
    it: logits and hidden state equal a whole prefill, at the prefill and at the next step."""
    shared = list(range(3, 23))
    a, b = shared + [30, 31, 32, 33], shared + [40, 41]  # src holds more than the shared start
    got = {}
    for reuse in (False, True):
        with Engine(tiny_gguf, n_ctx=128 * 2, n_threads=1, n_seq=2, unified=unified, hidden=True) as e:
            e.prefill_seq(a, 0)
            e.step_many([60], [0], [len(a)])  # the source is generating
            first = e.prefill_seq(b, 1, reuse=(0, len(shared)) if reuse else None).copy()
            h = e.hidden.copy()
            rows = e.step_many([50, 51], [0, 1], [len(a) + 1, len(b)])
            got[reuse] = (first, h, rows[0].copy(), rows[1].copy())  # the source's row untouched too
    for x, y in zip(got[False], got[True]):
        np.testing.assert_allclose(x, y, atol=ATOL)
    with Engine(tiny_gguf, n_ctx=128, n_threads=1) as e, pytest.raises(ValueError):
        e.prefill_seq(b, 0, reuse=(0, len(b)))  # the last token must be decoded for its logits


def test_score_rows_equal_steps(engine: Engine) -> None:
    ids = engine.tokenize(TEXT + " Let us think step by step.")
    first = 4
    rows = {pos: logits.copy() for pos, logits in engine.score(ids, first)}
    assert sorted(rows) == list(range(first, len(ids)))
    engine.reset()
    ref = {first: engine.load(ids[: first + 1]).copy()}
    for pos in range(first + 1, len(ids)):
        ref[pos] = engine.step(ids[pos]).copy()
    for pos, logits in rows.items():
        np.testing.assert_allclose(logits, ref[pos], atol=ATOL, err_msg=f"position {pos}")


def test_score_across_batches(tiny_gguf: Path, engine: Engine) -> None:
    ids = engine.tokenize(TEXT + " Let us think step by step.")
    ref = {pos: logits.copy() for pos, logits in engine.score(ids, 2)}
    with make(tiny_gguf, n_batch=4) as small:
        rows = {pos: logits.copy() for pos, logits in small.score(ids, 6)}
    assert sorted(rows) == list(range(6, len(ids)))
    for pos, logits in rows.items():
        np.testing.assert_allclose(logits, ref[pos], atol=ATOL)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), (b"", "truncated"), (b"GGML" + bytes(64), "bad magic")],
)
def test_bad_files_refused(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(S2TError, match=message):
        Engine(path)


def test_corrupt_gguf_refused(tmp_path: Path, tiny_gguf: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:2000])
    with pytest.raises(S2TError, match="could not load"):
        Engine(path)
