"""top_k against a full argsort reference, and the per-step features of Candidates."""

from __future__ import annotations

import numpy as np
import pytest

from s2t_edge.candidates import Candidates, candidates, top_k

VOCAB = 151_936


def reference(logits: np.ndarray, k: int) -> np.ndarray:
    """Best first, ties to the lower id: a stable sort of the negated logits."""
    return np.argsort(-logits, kind="stable")[:k]


def vectors() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(VOCAB).astype(np.float32) * 3
    negative = -np.abs(normal) - 100.0
    ties = np.round(rng.standard_normal(VOCAB), 1).astype(np.float32)  # many equal values
    flat = np.zeros(VOCAB, dtype=np.float32)  # everything tied
    spike = normal.copy()
    spike[[3, VOCAB - 1, 77_777]] = 50.0  # a tie at the top, incl. the last id
    few_high = np.full(VOCAB, -1e4, dtype=np.float32)  # fewer large values than the stride
    few_high[[5, 9000]] = (1.0, 2.0)
    return [normal, negative, ties, flat, spike, few_high]


@pytest.mark.parametrize("k", [1, 2, 8, 32])
@pytest.mark.parametrize("i", range(len(vectors())))
def test_top_k_matches_argsort(i: int, k: int) -> None:
    logits = vectors()[i]
    np.testing.assert_array_equal(top_k(logits, k), reference(logits, k))


@pytest.mark.parametrize("k", [1, 5, 32])
def test_top_k_random_small_vocabs(k: int) -> None:
    rng = np.random.default_rng(1)
    for n in (k, k + 1, 40, 1000):
        logits = rng.integers(-3, 3, n).astype(np.float32)  # ties everywhere
        np.testing.assert_array_equal(top_k(logits, k), reference(logits, k))


def test_top_k_bad_k() -> None:
    with pytest.raises(ValueError):
        top_k(np.zeros(100, dtype=np.float32), 0)
    with pytest.raises(ValueError):
        top_k(np.zeros(4, dtype=np.float32), 5)


def test_candidates_copy_out() -> None:
    logits = np.arange(100, dtype=np.float32)
    c = candidates(logits, 4)
    logits[:] = 0  # a later decode overwrites llama.cpp's buffer
    assert c.ids.tolist() == [99, 98, 97, 96]
    assert c.logits.tolist() == [99, 98, 97, 96]
    assert c.ids.dtype == np.int64 and c.logits.dtype == np.float32


def test_features() -> None:
    c = Candidates(ids=np.arange(4), logits=np.array([3.0, 1.0, 1.0, -2.0], dtype=np.float32))
    p = np.exp(c.logprobs)
    assert p.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(c.logprobs) <= 0)
    ref = np.exp(c.logits - c.logits.max())
    ref /= ref.sum()
    np.testing.assert_allclose(p, ref, rtol=1e-5)
    assert c.entropy == pytest.approx(float(-(ref * np.log(ref)).sum()), rel=1e-5)
    assert c.margin == pytest.approx(2.0)


def test_features_extremes() -> None:
    uniform = Candidates(ids=np.arange(8), logits=np.zeros(8, dtype=np.float32))
    assert uniform.entropy == pytest.approx(np.log(8))
    assert uniform.margin == 0.0
    peaked = Candidates(ids=np.arange(2), logits=np.array([100.0, -100.0], dtype=np.float32))
    assert peaked.entropy == pytest.approx(0.0, abs=1e-6)
    single = Candidates(ids=np.arange(1), logits=np.array([1.0], dtype=np.float32))
    assert single.margin == float("inf") and single.entropy == pytest.approx(0.0)
    assert np.exp(single.logprobs).sum() == pytest.approx(1.0)
