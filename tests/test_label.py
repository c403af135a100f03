"""`s2t-edge label` on the tiny models: the stored labels are what the two models compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from s2t_edge.train.trajectories import load_trajectories

from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.label import TEACHER_TOP, label
from s2t_edge.label_files import read_label, summarize_labels
from s2t_edge.shards import read_manifest, shard_paths
from s2t_edge.teacher import log_softmax

TINY = {"k": 4, "max_tokens": 12, "batch": 2, "threads": 1, "progress": False}


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> Path:
    out = tmp_path_factory.mktemp("labels")
    label(tiny_gguf, tiny_teacher_gguf, data, out, **TINY)
    return out


def test_labels_are_what_the_models_compute(labels: Path, tiny_gguf: Path, tiny_teacher_gguf: Path) -> None:
    paths = shard_paths(labels)
    assert len(paths) == 3
    with Engine(tiny_gguf, n_ctx=256, n_threads=1) as slm, Engine(tiny_teacher_gguf, n_ctx=256, n_threads=1) as t:
        for p in paths:
            meta, a = read_label(p)
            prompt, chosen = a["prompt"].tolist(), a["chosen"].tolist()
            assert meta["tokens"] == len(chosen) == len(a["slm_ids"]) and a["slm_ids"].shape[1] == 4
            assert meta["batch"] == 2  # near-ties may break otherwise at another batch size
            # the trajectory is the teacher's greedy answer, and `teacher_top1` is that token
            assert np.array_equal(a["chosen"], a["teacher_top1"])
            rows = [row.copy() for _, row in t.score(prompt + chosen[:-1], len(prompt) - 1)]
            assert [int(r.argmax()) for r in rows] == chosen
            slm_rows = [row.copy() for _, row in slm.score(prompt + chosen[:-1], len(prompt) - 1)]
            for i, (s_row, t_row) in enumerate(zip(slm_rows, rows)):
                ids = a["slm_ids"][i]
                assert list(ids) == list(np.argsort(-s_row, kind="stable")[:4])  # SLM's top-K, best first
                np.testing.assert_allclose(a["slm_logprobs"][i], log_softmax(s_row)[ids], atol=2e-3)
                # the teacher's log-prob where the id is in its top TEACHER_TOP, else that top's floor
                t_lp = log_softmax(t_row)
                floor = np.sort(t_lp)[-TEACHER_TOP]
                want = np.where(t_lp[ids] >= floor, t_lp[ids], floor)
                np.testing.assert_allclose(a["teacher_logprobs"][i], want, atol=5e-3)


def test_summary_and_resume(labels: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    s = summarize_labels(labels)
    assert s["problems"] == s["answers"] == 3 and s["k"] == 4 and 0 <= s["divergence_rate"] <= 1
    assert s["positions"] == sum(read_label(p)[0]["tokens"] for p in shard_paths(labels))
    before = {p.name: p.stat().st_mtime_ns for p in shard_paths(labels)}
    label(tiny_gguf, tiny_teacher_gguf, data, labels, **TINY)
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(labels)} == before  # nothing relabelled
    with pytest.raises(S2TError, match="other settings \\(k\\)"):
        label(tiny_gguf, tiny_teacher_gguf, data, labels, **{**TINY, "k": 3})


@pytest.fixture(scope="module")
def slm_labels_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path
) -> Path:
    out = tmp_path_factory.mktemp("slm-labels")
    label(tiny_gguf, tiny_teacher_gguf, data, out, trajectories="slm", **TINY)
    return out


def check_slm_trajectory_labels(
    out: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, decoder: Engine, n: int = 3, greedy: bool = True
) -> None:
    """Each stored trajectory is `decoder`'s greedy answer (or, sampled, a path through its top-K);
    the SLM's top-K are the base model's; the teacher's log-probs are exact (a prefill, no top cut)
    and `teacher_top1` is its argmax."""
    paths = shard_paths(out)
    assert len(paths) == n
    with Engine(tiny_gguf, n_ctx=256, n_threads=1) as slm, Engine(tiny_teacher_gguf, n_ctx=256, n_threads=1) as t:
        for p in paths:
            _, a = read_label(p)
            prompt, chosen = a["prompt"].tolist(), a["chosen"].tolist()
            d_rows = [row.copy() for _, row in decoder.score(prompt + chosen[:-1], len(prompt) - 1)]
            if greedy:
                assert [int(r.argmax()) for r in d_rows] == chosen
            else:  # sampled from the decoder's top-K
                assert all(c in np.argsort(-r, kind="stable")[:4] for c, r in zip(chosen, d_rows))
            s_rows = [row.copy() for _, row in slm.score(prompt + chosen[:-1], len(prompt) - 1)]
            t_rows = [row.copy() for _, row in t.score(prompt + chosen[:-1], len(prompt) - 1)]
            if greedy:
                assert a["teacher_top1"].tolist() == [int(r.argmax()) for r in t_rows]
            else:  # its argmax up to float reordering: a problem's samples share its prompt in the KV cache
                assert all(r[top] >= r.max() - 1e-3 for top, r in zip(a["teacher_top1"], t_rows))
            for i, (s_row, t_row) in enumerate(zip(s_rows, t_rows)):
                ids = a["slm_ids"][i]
                if greedy:
                    assert list(ids) == list(np.argsort(-s_row, kind="stable")[:4])
                else:  # the SLM's top-K, best first, up to near-ties the batched decode breaks otherwise
                    np.testing.assert_allclose(s_row[ids], np.sort(s_row)[::-1][:4], atol=1e-3)
                np.testing.assert_allclose(a["slm_logprobs"][i], log_softmax(s_row)[ids], atol=5e-3)  # float16
                np.testing.assert_allclose(a["teacher_logprobs"][i], log_softmax(t_row)[ids], atol=5e-3)


def test_slm_trajectories(slm_labels_dir: Path, tiny_gguf: Path, tiny_teacher_gguf: Path) -> None:
    with Engine(tiny_gguf, n_ctx=256, n_threads=1) as slm:
        check_slm_trajectory_labels(slm_labels_dir, tiny_gguf, tiny_teacher_gguf, slm)
    metas = [read_label(p)[0] for p in shard_paths(slm_labels_dir)]
    assert all(m["trajectories"] == "slm-greedy" for m in metas)
    # the teacher and the SLM disagree somewhere on the SLM's own path (else the test shows nothing)
    assert any(
        (read_label(p)[1]["teacher_top1"] != read_label(p)[1]["chosen"]).any() for p in shard_paths(slm_labels_dir)
    )


def test_adapter_trajectories(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    from test_adapter import adapter_bundle

    from s2t_edge.bundle import load_bundle

    bundle = adapter_bundle(tmp_path / "bundle", tiny_gguf)
    out = tmp_path / "labels"
    label(tiny_gguf, tiny_teacher_gguf, data, out, trajectories="slm", bundle=bundle, **TINY)
    b = load_bundle(bundle)
    with Engine(tiny_gguf, n_ctx=256, n_threads=1) as adapted:
        adapted.load_lora(b.adapter_path, b.adapter_scale)
        check_slm_trajectory_labels(out, tiny_gguf, tiny_teacher_gguf, adapted)
    assert read_label(shard_paths(out)[0])[0]["trajectories"] == f"adapter-greedy:{b.adapter['sha256']}"


def test_sampled_trajectories(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    """`samples=2, temperature > 0`: two seeded answers per problem drawn from the SLM's top-K, each
    its own label file that names its problem; the labels are what the models compute on that
    path; a rerun resumes, the same seed draws the same answers, another seed others."""
    args = {**TINY, "trajectories": "slm", "samples": 2, "temperature": 1.5, "seed": 1}
    out = tmp_path / "s1"
    label(tiny_gguf, tiny_teacher_gguf, data, out, **args)
    paths = shard_paths(out)
    metas = [read_label(p)[0] for p in paths]
    problems = sorted({m["problem"] for m in metas})
    assert len(problems) == 3
    assert sorted((m["problem"], m["sample"]) for m in metas) == [(q, j) for q in problems for j in (0, 1)]
    assert all(m["problem_id"] == f"{m['problem']}.s{m['sample']}" and m["trajectories"] == "slm-sample" for m in metas)
    with Engine(tiny_gguf, n_ctx=256, n_threads=1) as slm:
        check_slm_trajectory_labels(out, tiny_gguf, tiny_teacher_gguf, slm, n=6, greedy=False)
    summary = summarize_labels(out)
    assert summary["problems"] == 3 and summary["answers"] == 6 and 0 <= summary["solved"] <= 3
    chosen = {p.name: read_label(p)[1]["chosen"] for p in paths}
    assert any((read_label(p)[1]["slm_ids"][:, 0] != chosen[p.name]).any() for p in paths)  # sampled, not greedy
    before = {p.name: p.stat().st_mtime_ns for p in paths}
    label(tiny_gguf, tiny_teacher_gguf, data, out, **args)
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(out)} == before  # nothing relabelled
    again, other = tmp_path / "s1-again", tmp_path / "s2"
    label(tiny_gguf, tiny_teacher_gguf, data, again, **args)
    assert all(np.array_equal(read_label(p)[1]["chosen"], chosen[p.name]) for p in shard_paths(again))
    label(tiny_gguf, tiny_teacher_gguf, data, other, **{**args, "seed": 2})
    assert any(not np.array_equal(read_label(p)[1]["chosen"], chosen[p.name]) for p in shard_paths(other))
    with pytest.raises(S2TError, match="other settings \\(seed\\)"):
        label(tiny_gguf, tiny_teacher_gguf, data, out, **{**args, "seed": 2})
    with pytest.raises(S2TError, match="--samples N needs --temperature"):
        label(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "x", **{**args, "temperature": 0.0})
    with pytest.raises(S2TError, match="--score right skips"):
        label(
            tiny_gguf, tiny_teacher_gguf, data, tmp_path / "z", **{**args, "trajectories": "teacher", "score": "right"}
        )


def test_score_right_only(
    tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`score="right"`: the same seeded answers, the right ones scored exactly as `score="all"`
    scores them, the wrong ones recorded unscored (tokens and grade) and left out of training."""
    args = {**TINY, "trajectories": "slm", "samples": 2, "temperature": 1.5, "seed": 1}
    full, right = tmp_path / "all", tmp_path / "right"
    label(tiny_gguf, tiny_teacher_gguf, data, full, **args)
    gold = read_label(shard_paths(full)[0])[0]["gold"]
    monkeypatch.setattr("s2t_edge.label.is_correct", lambda pred, g: g == gold)  # the first problem's answers are right
    label(tiny_gguf, tiny_teacher_gguf, data, right, **args, score="right")
    assert read_manifest(right)["settings"]["score"] == "right"
    kept = 0
    for p, q in zip(shard_paths(full), shard_paths(right), strict=True):
        (_, a), (meta, b) = read_label(p), read_label(q)
        assert p.name == q.name and np.array_equal(a["chosen"], b["chosen"])
        if meta["correct"]:
            kept += 1
            assert "scored" not in meta and all(np.array_equal(a[f], b[f]) for f in a)
        else:
            assert meta["scored"] is False and b["slm_ids"].shape == (0, TINY["k"]) and len(b["teacher_top1"]) == 0
    assert 0 < kept < 6
    assert len(load_trajectories(right)) == kept
    assert summarize_labels(right)["scored"] == kept and summarize_labels(right)["answers"] == 6
    with pytest.raises(S2TError, match="use it with --trajectories slm"):
        label(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "y", **{**args, "trajectories": "teacher"})


def test_label_refusals(tmp_path: Path, labels: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    with pytest.raises(S2TError, match="other settings \\(trajectories\\)"):
        label(tiny_gguf, tiny_teacher_gguf, data, labels, trajectories="slm", **TINY)
    with pytest.raises(S2TError, match="use it with --trajectories slm"):
        label(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "a", bundle=tmp_path, **TINY)
    with pytest.raises(S2TError, match="unknown trajectories"):
        label(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "b", trajectories="both", **TINY)


def test_skip_labels_a_later_stretch(
    tmp_path: Path, labels: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path
) -> None:
    out = tmp_path / "later"
    label(tiny_gguf, tiny_teacher_gguf, data, out, skip=2, **TINY)
    assert [p.name for p in shard_paths(out)] == [p.name for p in shard_paths(labels)][2:]
    _, a = read_label(shard_paths(out)[0])
    _, b = read_label(shard_paths(labels)[2])
    assert np.array_equal(a["prompt"], b["prompt"])  # the same problem, not the first one again
    with pytest.raises(S2TError, match="--skip 3 leaves none of the 3 problems"):
        label(tiny_gguf, tiny_teacher_gguf, data, tmp_path / "none", skip=3, **TINY)
