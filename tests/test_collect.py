"""`collect` (teacher-labelled candidate groups), shards, and `analyze coverage` on the tiny pair."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from s2t_edge.analyze import KS, coverage, format_coverage, plot_coverage
from s2t_edge.cli import main
from s2t_edge.collect import collect, problem_prompt
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.prompt import ChatTemplate
from s2t_edge.shards import (
    POSITION_FIELDS,
    SCHEMA_VERSION,
    iter_shards,
    read_manifest,
    read_shard,
    shard_paths,
)
from s2t_edge.teacher import log_softmax

K = 4
MAX_TOKENS = 12
N_EMBD = 64
PROBLEMS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "A box holds 4 pens. How many pens are in 3 boxes?", "answer": "4 * 3 = 12\n#### 12"},
    {"question": "Sara had 10 dollars and spent 7. How much is left?", "answer": "10 - 7 = 3\n#### 3"},
]


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(slm: Path, teacher: Path, data: Path, out: Path, **kw) -> dict:
    kw = {"k": K, "max_tokens": MAX_TOKENS, "n_ctx": 512, "threads": 1, "progress": False, **kw}
    return collect(slm, teacher, data, out, **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "gsm.jsonl", PROBLEMS)


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> Path:
    out = tmp_path_factory.mktemp("groups")
    run(tiny_gguf, tiny_teacher_gguf, data, out)
    return out


def mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in shard_paths(d)}


def test_shards_complete_and_consistent(groups: Path) -> None:
    shards = list(iter_shards(groups))
    assert len(shards) == len(PROBLEMS)
    total = 0
    for meta, a in shards:
        assert set(POSITION_FIELDS) <= set(a)
        T = meta["tokens"]
        assert 1 <= T <= MAX_TOKENS + 1  # + the end-of-turn step when the model stopped
        total += T
        assert a["slm_ids"].shape == a["slm_logits"].shape == a["teacher_probs"].shape == (T, K)
        assert a["hidden"].shape == (T, N_EMBD) and a["hidden"].dtype == np.float16
        for f in ("entropy", "margin", "teacher_top1", "teacher_top1_prob", "kl", "chosen"):
            assert a[f].shape == (T,), f
        assert np.isfinite(a["hidden"].astype(np.float32)).all() and np.abs(a["hidden"]).max() > 0
        tp = a["teacher_probs"]
        assert ((tp >= 0) & (tp <= 1)).all() and (tp.sum(1) <= 1 + 1e-5).all()
        # the teacher's full-vocab top-1 is at least as likely as any SLM candidate
        assert (a["teacher_top1_prob"] + 1e-6 >= tp.max(1)).all()
        assert (a["kl"] >= -1e-5).all() and (a["entropy"] >= 0).all() and (a["margin"] >= 0).all()
        # greedy trajectories: the chosen token is the SLM's top-1, candidates best first
        np.testing.assert_array_equal(a["chosen"], a["slm_ids"][:, 0])
        assert (np.diff(a["slm_logits"], axis=1) <= 0).all()
        assert meta["gold"] in {"5", "12", "3"} and meta["finish_reason"] in ("stop", "length")
        assert meta["schema"] == SCHEMA_VERSION
    m = read_manifest(groups)
    assert m["problems"] == len(PROBLEMS) and m["positions"] == total
    assert m["correct"] == sum(meta["correct"] for meta, _ in shards)
    assert m["k"] == K and m["max_tokens"] == MAX_TOKENS and m["mode"] == "greedy"
    assert m["skipped_bad_lines"] == 0 and len(m["slm_sha256"]) == 64


def test_shards_hold_what_the_models_compute(groups: Path, tiny_gguf: Path, tiny_teacher_gguf: Path) -> None:
    """Each position re-scored by an independent prefill: the SLM's top-K and logits, the teacher's
    probabilities on them and its own top-1."""
    question = {p["answer"].split("#### ")[1]: p["question"] for p in PROBLEMS}
    with Engine(tiny_gguf, n_ctx=512, n_threads=1) as slm, Engine(tiny_teacher_gguf, n_ctx=512, n_threads=1) as t:
        for meta, a in iter_shards(groups):
            prompt = problem_prompt(slm, ChatTemplate(slm), question[meta["gold"]])
            assert meta["prompt_tokens"] == len(prompt)
            seq, first = prompt + a["chosen"][:-1].tolist(), len(prompt) - 1
            for (_, s_row), (_, t_row), i in zip(slm.score(seq, first), t.score(seq, first), range(meta["tokens"])):
                ids = a["slm_ids"][i]
                assert list(ids) == list(np.argsort(-s_row, kind="stable")[:K])
                np.testing.assert_allclose(a["slm_logits"][i], s_row[ids], atol=5e-3)  # step vs prefill sums
                probs = np.exp(log_softmax(t_row))
                np.testing.assert_allclose(a["teacher_probs"][i], probs[ids], atol=1e-3)
                assert a["teacher_top1"][i] == int(t_row.argmax())
                np.testing.assert_allclose(a["teacher_top1_prob"][i], probs.max(), atol=1e-3)


def test_s2t_mode_follows_teacher(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    out = tmp_path / "g"
    run(tiny_gguf, tiny_teacher_gguf, data, out, limit=1, mode="s2t")
    ((_, a),) = iter_shards(out)
    rows = np.arange(len(a["chosen"]))
    # on-policy S2T: every step took the candidate the teacher scored highest
    np.testing.assert_array_equal(a["slm_ids"][rows, a["teacher_probs"].argmax(1)], a["chosen"])
    assert read_manifest(out)["mode"] == "s2t"


def test_resume_skips_existing_shards(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    out = tmp_path / "g"
    run(tiny_gguf, tiny_teacher_gguf, data, out, limit=2)
    first = mtimes(out)
    m1 = read_manifest(out)
    assert len(first) == 2 and m1["problems"] == 2
    m = run(tiny_gguf, tiny_teacher_gguf, data, out, limit=2)  # nothing to do
    assert mtimes(out) == first and m["problems"] == 2 and m["positions"] == m1["positions"]
    m = run(tiny_gguf, tiny_teacher_gguf, data, out)  # a larger limit completes the set
    after = mtimes(out)
    assert len(after) == 3 and {n: after[n] for n in first} == first
    shards = list(iter_shards(out))
    assert m["problems"] == read_manifest(out)["problems"] == 3
    assert read_manifest(out)["positions"] == sum(meta["tokens"] for meta, _ in shards)


def test_other_settings_refused(groups: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    before = mtimes(groups)
    with pytest.raises(S2TError, match=r"other settings \(k\)"):
        run(tiny_gguf, tiny_teacher_gguf, data, groups, k=2)
    with pytest.raises(S2TError, match="other settings.*teacher"):
        run(tiny_gguf, tiny_gguf, data, groups)
    assert mtimes(groups) == before


def test_other_vocab_teacher_refused(tmp_path: Path, tiny_gguf: Path, tiny_other_vocab_gguf: Path, data: Path) -> None:
    with pytest.raises(S2TError, match="shared tokenizer"):
        run(tiny_gguf, tiny_other_vocab_gguf, data, tmp_path / "g")
    assert not shard_paths(tmp_path / "g")


def test_other_schema_shard_refused(tmp_path: Path, groups: Path) -> None:
    meta, arrays = read_shard(shard_paths(groups)[0])
    bad = tmp_path / "old.npz"
    np.savez_compressed(bad, meta=np.array(json.dumps({**meta, "schema": SCHEMA_VERSION + 1})), **arrays)
    with pytest.raises(S2TError, match=f"schema {SCHEMA_VERSION + 1}.*re-collect"):
        read_shard(bad)
    with pytest.raises(S2TError, match="schema"):
        list(iter_shards(tmp_path))


def test_unreadable_shard_refused(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(S2TError, match="not a readable shard"):
        list(iter_shards(tmp_path))


def test_empty_or_missing_groups_dir_refused(tmp_path: Path) -> None:
    with pytest.raises(S2TError, match="no shards"):
        list(iter_shards(tmp_path))
    with pytest.raises(S2TError, match="no shards"):
        coverage(tmp_path)
    with pytest.raises(S2TError, match="no such groups directory"):
        list(iter_shards(tmp_path / "missing"))


def test_malformed_line_named_and_skippable(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [PROBLEMS[0], "{not json", PROBLEMS[1]])
    with pytest.raises(S2TError, match=r"bad\.jsonl:2: not valid JSON.*--skip-bad"):
        run(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "g")
    m = run(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "g2", skip_bad=True)
    assert m["problems"] == 2
    assert read_manifest(tmp_path / "g2")["skipped_bad_lines"] == 1
    # ids stay tied to line numbers, so the skipped line does not shift them
    assert sorted(meta["problem_id"] for meta, _ in iter_shards(tmp_path / "g2")) == ["bad:1", "bad:3"]


def test_coverage(groups: Path, tmp_path: Path) -> None:
    r = coverage(groups)
    ids = np.concatenate([a["slm_ids"] for _, a in iter_shards(groups)])
    top1 = np.concatenate([a["teacher_top1"] for _, a in iter_shards(groups)])
    div = ids[:, 0] != top1
    assert r["positions"] == len(top1) == read_manifest(groups)["positions"]
    assert r["stored_k"] == K and r["divergence_rate"] == pytest.approx(div.mean())
    assert r["rows"]["divergence"]["n"] == int(div.sum())
    for name, row in r["rows"].items():
        hits = [row[f"hit@{k}"] for k in KS if k <= K]
        assert all(row[f"hit@{k}"] is None for k in KS if k > K), name
        if row["n"]:
            assert all(0 <= h <= 1 for h in hits) and hits == sorted(hits), name
    if div.any():
        assert r["rows"]["divergence"]["hit@1"] == 0.0  # by definition of a divergence point
        expected = (ids[div] == top1[div, None]).any(1).mean()
        assert r["rows"]["divergence"][f"hit@{K}"] == pytest.approx(expected)
    text = format_coverage(r)
    assert f"{r['positions']} positions" in text and "divergence" in text
    png = plot_coverage(r, tmp_path / "cov.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_collect_and_coverage(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    out = tmp_path / "g"
    r = CliRunner().invoke(
        main,
        [
            "collect",
            "--slm",
            str(tiny_gguf),
            "--teacher",
            str(tiny_teacher_gguf),
            "--data",
            str(data),
            "--out",
            str(out),
            "--k",
            str(K),
            "--max-tokens",
            str(MAX_TOKENS),
            "--limit",
            "2",
            "--threads",
            "1",
            "--ctx",
            "512",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "2 problems" in r.stdout and len(shard_paths(out)) == 2
    r = CliRunner().invoke(main, ["analyze", "coverage", str(out), "--json", "--plot", str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == json.loads(json.dumps(coverage(out)))
    assert (tmp_path / "c.png").stat().st_size > 0
    r = CliRunner().invoke(main, ["analyze", "coverage", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "error:" in r.stderr and "no such groups directory" in r.stderr


def test_shard_write_is_atomic_name(groups: Path) -> None:
    assert not list(groups.glob("*.tmp.npz")) and not (groups / "manifest.tmp").exists()
    assert all(os.path.getsize(p) > 0 for p in shard_paths(groups))
