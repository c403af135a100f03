"""The decode loop on the tiny GGUF: greedy parity, stats, trigger/selector plumbing, stopping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from s2t_edge.candidates import Candidates, Step
from s2t_edge.decode import DecodeStats, decode
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.policy import greedy, sampling
from s2t_edge.runtime import Models, build_policy
from s2t_edge.selector import Sample
from s2t_edge.trigger import Always

PROMPT = "Hello world, the answer is"


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path) -> Engine:
    return Engine(tiny_gguf, n_ctx=256, n_threads=1)


def run(engine: Engine, prompt: list[int], **kw) -> tuple[list[int], DecodeStats]:
    stats = DecodeStats()
    return [t.id for t in decode(engine, prompt, stats=stats, **kw)], stats


class Second:
    """Always pick the second candidate."""

    name = "second"

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def select(self, step: Step) -> int:
        self.steps.append(step)
        return int(step.cands.ids[1])


class EogAt:
    """Greedy, but pick the end-of-turn token at step `n`."""

    name = "eog-at"

    def __init__(self, n: int, eog: int) -> None:
        self.n, self.eog, self.calls = n, eog, 0

    def select(self, step: Step) -> int:
        self.calls += 1
        return self.eog if self.calls == self.n else int(step.cands.ids[0])


def test_greedy_equals_manual_argmax(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    ids, stats = run(engine, prompt, max_tokens=20)
    engine.reset()
    logits = engine.load(prompt)
    manual = []
    for _ in range(20):
        token = int(np.argmax(logits))
        if engine.is_eog(token):
            break
        manual.append(token)
        logits = engine.step(token)
    assert ids == manual
    assert stats.steps == len(ids) == 20 and stats.prompt_tokens == len(prompt)
    assert stats.triggers == stats.flips == 0
    assert stats.finish_reason == "length"
    assert stats.model_s > 0 and stats.tokens_per_s > 0
    d = stats.as_dict()
    assert d["trigger_rate"] == d["flip_rate"] == 0.0 and d["steps"] == 20


def test_tokens_carry_text(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    tokens = list(decode(engine, prompt, max_tokens=12))
    text = "".join(t.text for t in tokens)
    assert text == engine.detokenize([t.id for t in tokens]).rstrip("\ufffd")


def test_always_second_flips_every_step(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    selector = Second()
    ids, stats = run(engine, prompt, max_tokens=10, k=4, trigger=Always(), selector=selector)
    assert stats.steps == stats.triggers == stats.flips == 10
    assert ids == [int(s.cands.ids[1]) for s in selector.steps]
    first = selector.steps[0]
    assert first.n_prompt == len(prompt) and first.cands.ids.shape == (4,)
    assert first.hidden is None


def test_hidden_reaches_selector(tiny_gguf: Path) -> None:
    selector = Second()
    with Engine(tiny_gguf, n_ctx=256, n_threads=1, hidden=True) as e:
        run(e, e.tokenize(PROMPT), max_tokens=3, trigger=Always(), selector=selector)
    assert all(s.hidden is not None and s.hidden.shape == (64,) for s in selector.steps)


def test_sampling_seed_reproducible(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)

    def sample(seed: int) -> list[int]:
        policy = sampling(1.5, top_k=16, seed=seed)
        return run(engine, prompt, max_tokens=24, **policy.decode_args())[0]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_sample_top_p_one() -> None:
    """top_p=1 keeps the whole support even when the cumulative sum rounds below 1."""
    logits = np.linspace(0, -3, 40).astype(np.float32)  # this cumsum ends at 0.999...
    s = Sample(temperature=1.0, top_p=1.0, top_k=40, seed=0)
    step = Step([], 0, Candidates(np.arange(40), logits), None)
    drawn = {s.select(step) for _ in range(3000)}
    assert drawn <= set(range(40)) and 39 in drawn  # the least likely id (p ≈ 0.004) is still drawn


def test_build_policy(engine: Engine) -> None:
    models = Models(engine)  # no bundle, no teacher
    assert build_policy(models, k=5).name == "greedy" and build_policy(models, k=5).k == 5
    p = build_policy(models, k=12, temperature=0.7, seed=3)
    assert p.name == "sample" and p.k == 12 and p.selector.temperature == 0.7
    with pytest.raises(S2TError, match="temperature"):
        build_policy(models, temperature=-1)
    with pytest.raises(S2TError, match="needs a bundle"):
        build_policy(models, "s2t-local")
    with pytest.raises(S2TError, match="needs a bundle"):  # sampling "s2t-local" without one is no base sampling
        build_policy(models, "s2t-local", temperature=0.7)


def test_max_tokens(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    for n in (1, 7):
        ids, stats = run(engine, prompt, max_tokens=n, **greedy(4).decode_args())
        assert len(ids) == stats.steps == n and stats.finish_reason == "length"


def test_stops_at_eog(engine: Engine) -> None:
    eog = engine.tokenize("<|im_end|>")[0]
    assert engine.is_eog(eog)
    ids, stats = run(engine, engine.tokenize(PROMPT), max_tokens=50, trigger=Always(), selector=EogAt(5, eog))
    assert len(ids) == 4 and eog not in ids
    assert stats.steps == 5 and stats.finish_reason == "stop"


def test_stops_when_context_full(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    ids, stats = run(engine, prompt, max_tokens=1000)
    # the last token is accepted without being decoded, so it needs no room in the cache
    assert engine.n_past == engine.n_ctx and stats.finish_reason == "length"
    assert len(prompt) + len(ids) == engine.n_ctx + 1


def test_early_stop_keeps_stats(engine: Engine) -> None:
    stats = DecodeStats()
    gen = decode(engine, engine.tokenize(PROMPT), max_tokens=50, stats=stats)
    for i, _ in enumerate(gen):
        if i == 2:
            break
    gen.close()
    assert stats.steps == 3
