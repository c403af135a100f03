"""Continuous batching of many prompts (`decode_batch`) on the tiny SLM, and `eval --batch`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from s2t_edge.batch import decode_batch
from s2t_edge.cli import main
from s2t_edge.decode import decode
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.eval.runner import parse_policies, run_eval
from s2t_edge.parallel import sample_batch, sample_parallel
from s2t_edge.policy import greedy
from s2t_edge.runtime import build_policy, open_models
from tests.conftest import PROBLEMS
from tests.test_runtime_policy import open_tiny, run

QUESTIONS = [
    "What is 2 + 2?",
    "Name a colour.",
    "Count to five.",
    "Say hello in French.",
    "What is the capital of Italy?",
]


def prompts(e: Engine) -> list[list[int]]:
    return [e.tokenize(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n") for q in QUESTIONS]


def sequential(model: Path, max_tokens: int, **engine_kw) -> list[list[int]]:
    with Engine(model, n_ctx=512, n_threads=1, **engine_kw) as e:
        return [[t.id for t in decode(e, p, max_tokens=max_tokens)] for p in prompts(e)]


@pytest.mark.parametrize("n_seq", [1, 2, 5])
def test_batch_matches_one_prompt_at_a_time(tiny_gguf: Path, n_seq: int) -> None:
    """Fewer slots than prompts exercises refilling a finished slot with the next prompt."""
    ref = sequential(tiny_gguf, 12)
    with Engine(tiny_gguf, n_ctx=512 * n_seq, n_threads=1, n_seq=n_seq, unified=False) as e:
        got = {i: (ids, st) for i, ids, st in decode_batch(e, prompts(e), greedy(), max_tokens=12)}
        assert e.n_past == 0
    assert sorted(got) == list(range(len(QUESTIONS)))
    assert [got[i][0] for i in range(len(QUESTIONS))] == ref
    for i, (ids, st) in got.items():
        assert st.prompt_tokens == len(prompts_of(tiny_gguf)[i])
        assert st.steps == len(ids) + (st.finish_reason == "stop")
        assert st.finish_reason in ("stop", "length") and st.model_s > 0 and st.prefill_s > 0
        assert (st.finish_reason == "length") == (len(ids) == 12)


def prompts_of(model: Path) -> list[list[int]]:
    with Engine(model, n_ctx=512, n_threads=1) as e:
        return prompts(e)


def test_batch_runs_s2t_local_per_slot(tiny_gguf: Path, always_bundle: Path) -> None:
    """The reranker sees each slot's own hidden state: the batch equals s2t-local one prompt at a time."""
    seq_models = open_tiny(tiny_gguf, always_bundle)
    try:
        policy = build_policy(seq_models, "s2t-local")
        ref = [run(seq_models.slm, p, **policy.decode_args()) for p in prompts(seq_models.slm)]
    finally:
        seq_models.close()
    models = open_tiny(tiny_gguf, always_bundle, n_seq=3)
    try:
        policy = build_policy(models, "s2t-local")
        got = {i: (ids, st) for i, ids, st in decode_batch(models.slm, prompts(models.slm), policy, max_tokens=10)}
    finally:
        models.close()
    assert [got[i][0] for i in range(len(QUESTIONS))] == [ids for ids, _ in ref]
    assert [(got[i][1].triggers, got[i][1].flips) for i in range(len(QUESTIONS))] == [
        (st.triggers, st.flips) for _, st in ref
    ]
    assert sum(st.flips for _, st in ref) > 0  # the reranker did change tokens


def test_batch_refuses_policy_without_hidden(tiny_gguf: Path, always_bundle: Path) -> None:
    models = open_tiny(tiny_gguf, always_bundle)
    try:
        policy = build_policy(models, "s2t-local")
    finally:
        models.close()
    with Engine(tiny_gguf, n_ctx=512, n_threads=1, n_seq=2) as e, pytest.raises(S2TError, match="hidden=True"):
        list(decode_batch(e, prompts(e), policy))


def test_batch_prompt_longer_than_a_slot(tiny_gguf: Path) -> None:
    with Engine(tiny_gguf, n_ctx=64, n_threads=1, n_seq=2, unified=False) as e:
        assert e.n_ctx_seq == e.n_ctx // 2
        with pytest.raises(S2TError, match="context overflow"):
            list(decode_batch(e, [e.tokenize("word " * 300)], greedy()))


def test_batch_stops_when_a_slot_is_full(tiny_gguf: Path) -> None:
    with Engine(tiny_gguf, n_ctx=2 * 256, n_threads=1, n_seq=2, unified=False) as e:
        ps = prompts(e)[:2]
        out = {i: (ids, st) for i, ids, st in decode_batch(e, ps, greedy(), max_tokens=10_000)}
    # the tiny model never ends its turn: each slot fills its own cache and stops there, the other unharmed
    assert {i: (st.finish_reason, len(ps[i]) + len(ids)) for i, (ids, st) in out.items()} == {
        i: ("length", e.n_ctx_seq + 1) for i in range(2)
    }


def test_run_eval_batched_equals_unbatched(tmp_path: Path, tiny_gguf: Path, bundle_dir: Path, data: Path) -> None:
    specs = parse_policies(["greedy", "s2t-local"])
    one = open_tiny(tiny_gguf, bundle_dir)
    try:
        run_eval(one, data, specs, tmp_path / "one", max_tokens=10, progress=False)
    finally:
        one.close()
    many = open_tiny(tiny_gguf, bundle_dir, n_seq=2)
    try:
        rows = run_eval(many, data, specs, tmp_path / "many", max_tokens=10, progress=False, batch=2)
        assert all(r["settings"]["batch"] == 2 for r in rows)  # the table knows how each row was decoded
        with pytest.raises(S2TError, match="different settings: batch"):  # not mixed with --batch 1
            run_eval(many, data, specs[:1], tmp_path / "one", max_tokens=10, progress=False, batch=2)
    finally:
        many.close()
    assert [r["n"] for r in rows] == [len(PROBLEMS)] * 2
    for name in ("greedy", "s2t-local"):
        a = {r["id"]: r for r in map(json.loads, (tmp_path / "one" / name / "results.jsonl").read_text().splitlines())}
        b = {r["id"]: r for r in map(json.loads, (tmp_path / "many" / name / "results.jsonl").read_text().splitlines())}
        assert sorted(a) == sorted(b)
        for i in a:
            assert (a[i]["output"], a[i]["tokens"], a[i]["flips"]) == (b[i]["output"], b[i]["tokens"], b[i]["flips"])
            assert b[i]["seconds"] > 0
        assert json.loads((tmp_path / "many" / name / "settings.json").read_text())["batch"] == 2


def test_cli_eval_batch(tmp_path: Path, tiny_gguf: Path, data: Path) -> None:
    args = ["eval", "--data", str(data), "--policy", "greedy", "--model", str(tiny_gguf), "--threads", "1"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--batch", "3", "--max-tokens", "8", "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert row["n"] == len(PROBLEMS)
    r1 = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "s"), "--max-tokens", "8", "--json"])
    assert r1.exit_code == 0, r1.output
    assert json.loads(r1.stdout)[0]["correct"] == row["correct"]
    out_b = (tmp_path / "b" / "greedy" / "results.jsonl").read_text().splitlines()
    out_s = (tmp_path / "s" / "greedy" / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["output"] for x in out_b) == sorted(json.loads(x)["output"] for x in out_s)


@pytest.mark.parametrize("mode", ["s2t", "takeover"])
def test_batch_teacher_policies_match_one_prompt_at_a_time(tiny_gguf: Path, tiny_teacher_gguf: Path, mode: str) -> None:
    """The teacher runs as a second batch in lockstep and selects exactly as it does alone."""
    seq = open_models(str(tiny_gguf), bundle="none", teacher=str(tiny_teacher_gguf), ctx=256, threads=1)
    try:
        policy = build_policy(seq, mode)
        ref = [run(seq.slm, p, **policy.decode_args()) for p in prompts(seq.slm)]
    finally:
        seq.close()
    many = open_models(
        str(tiny_gguf),
        bundle="none",
        teacher=str(tiny_teacher_gguf),
        ctx=256,
        threads=1,
        n_seq=2,
        teacher_seq=2,
    )
    try:
        policy = build_policy(many, mode)
        got = {i: (ids, st) for i, ids, st in decode_batch(many.slm, prompts(many.slm), policy, max_tokens=10)}
        with pytest.raises(S2TError, match="trigger always only"):
            list(decode_batch(many.slm, prompts(many.slm), build_policy(many, mode, trigger="entropy", threshold=0.1)))
    finally:
        many.close()
    assert [got[i][0] for i in range(len(QUESTIONS))] == [ids for ids, _ in ref]
    assert [got[i][1].flips for i in range(len(QUESTIONS))] == [st.flips for _, st in ref]
    assert sum(st.flips for _, st in ref) > 0 and all(st.triggers == st.steps for _, st in ref)


def test_cli_eval_refuses_bad_data_before_loading_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing file or a malformed line is reported at once, not after the models load."""
    import s2t_edge.runtime

    def no_models(*a, **kw):
        raise AssertionError("models were opened before the data was checked")

    monkeypatch.setattr(s2t_edge.runtime, "open_models", no_models)
    r = CliRunner().invoke(main, ["eval", "--data", str(tmp_path / "missing.jsonl"), "--policy", "greedy"])
    assert r.exit_code != 0 and "data file not found" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    r = CliRunner().invoke(main, ["eval", "--data", str(bad), "--policy", "greedy", "--batch", "4"])
    assert r.exit_code != 0 and "bad.jsonl:2" in r.output


# ---- maj@N across problems -----------------------------------------------------------------------


@pytest.mark.parametrize("n_seq", [3, 6, 9])
def test_sample_batch_matches_one_prompt_at_a_time(tiny_gguf: Path, n_seq: int) -> None:
    """Groups of N sequences, one per prompt, refilled as prompts finish; each prompt's samples
    equal `sample_parallel` on that prompt alone with the same seed (its own random stream)."""
    kw = {"max_tokens": 10, "temperature": 1.0}
    with Engine(tiny_gguf, n_ctx=512, n_threads=1, n_seq=3) as e:
        ps = prompts(e)
        ref = [sample_parallel(e, p, 3, seed=100 + i, **kw) for i, p in enumerate(ps)]
    assert len({tuple(map(tuple, r)) for r in ref}) > 1
    with Engine(tiny_gguf, n_ctx=512 * n_seq, n_threads=1, n_seq=n_seq) as e:
        got = {i: (s, sec) for i, s, sec in sample_batch(e, ps, 3, seeds=[100 + i for i in range(len(ps))], **kw)}
        assert e.n_past == 0
    assert sorted(got) == list(range(len(ps)))
    assert [got[i][0] for i in range(len(ps))] == ref
    assert all(sec > 0 for _, sec in got.values())


def test_sample_batch_needs_room_for_one_group(tiny_gguf: Path) -> None:
    with Engine(tiny_gguf, n_ctx=512, n_threads=1, n_seq=2) as e:
        with pytest.raises(S2TError, match="maj@3 needs an engine with at least 3 sequences"):
            list(sample_batch(e, prompts(e), 3))


def test_cli_eval_batch_maj(tmp_path: Path, tiny_gguf: Path, data: Path) -> None:
    """`eval --batch` runs maj@N N sequences per problem, several problems at once: same votes as
    one problem at a time, recorded as a batched run."""
    args = ["eval", "--data", str(data), "--policy", "maj@2", "--model", str(tiny_gguf), "--threads", "1"]
    args += ["--max-tokens", "8", "--json"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--batch", "4"])
    assert r.exit_code == 0, r.output
    r1 = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "s")])
    assert r1.exit_code == 0, r1.output
    assert json.loads(r.stdout)[0]["n"] == len(PROBLEMS)
    batched, single = (
        {json.loads(x)["id"]: json.loads(x) for x in (d / "maj_at_2" / "results.jsonl").read_text().splitlines()}
        for d in (tmp_path / "b", tmp_path / "s")
    )
    assert sorted(batched) == sorted(single)
    for i in single:
        assert (batched[i]["answers"], batched[i]["pred"], batched[i]["tokens"]) == (
            single[i]["answers"],
            single[i]["pred"],
            single[i]["tokens"],
        )
    assert json.loads((tmp_path / "b" / "maj_at_2" / "settings.json").read_text())["batch"] == 4


@pytest.mark.parametrize(
    ("extra", "n_seq", "min_ctx"),
    [
        ([], 8, 1024 + 8 * 600),  # one problem's 8 samples share the cache: prompt + 8 answers
        (["--batch", "16"], 16, 16 * (600 + 1024)),  # 2 problems x 8 samples, a share per sample
        (["--batch", "4"], 8, 1024 + 8 * 600),  # fewer slots than samples: one problem at a time
    ],
)
def test_cli_eval_sizes_the_cache_for_maj(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: Path, extra: list[str], n_seq: int, min_ctx: int
) -> None:
    import s2t_edge.runtime

    seen = {}

    def capture(*a, **kw):
        seen.update(kw)
        raise S2TError("stop here")

    monkeypatch.setattr(s2t_edge.runtime, "open_models", capture)
    r = CliRunner().invoke(main, ["eval", "--data", str(data), "--policy", "maj@8", "--max-tokens", "600", *extra])
    assert "stop here" in r.output
    assert seen["n_seq"] == n_seq and seen["ctx"] >= min_ctx


def test_sample_batch_refuses_bad_arguments(tiny_gguf: Path) -> None:
    with Engine(tiny_gguf, n_ctx=512, n_threads=1, n_seq=2) as e:
        with pytest.raises(S2TError, match="max_tokens must be at least 1"):
            list(sample_batch(e, prompts(e), 2, max_tokens=0))
        with pytest.raises(ValueError, match="2 seeds for 5 prompts"):
            list(sample_batch(e, prompts(e), 2, seeds=[1, 2]))
    r = CliRunner().invoke(main, ["eval", "--data", "x.jsonl", "--policy", "maj@2", "--max-tokens", "0"])
    assert r.exit_code == 2 and "Invalid value for '--max-tokens'" in r.output


def test_batch_budget_per_prompt(tiny_gguf: Path) -> None:
    """`max_tokens` may give each prompt its own budget; a wrong count is refused."""
    budgets = [3, 12, 1, 7, 5]
    with Engine(tiny_gguf, n_ctx=512 * 2, n_threads=1, n_seq=2, unified=False) as e:
        got = {i: ids for i, ids, _ in decode_batch(e, prompts(e), greedy(), max_tokens=budgets)}
        with pytest.raises(S2TError, match="2 token budgets for 5 prompts"):
            list(decode_batch(e, prompts(e), greedy(), max_tokens=[1, 2]))
    ref = sequential(tiny_gguf, 12)
    assert [got[i] for i in range(len(QUESTIONS))] == [r[:b] for r, b in zip(ref, budgets)]
