"""Runtime on the tiny SLM: bundles opened and verified, policies built, s2t-local decoding,
parallel sampling, the eval runner and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from s2t_edge.bundle import MANIFEST, load_bundle
from s2t_edge.cli import main
from s2t_edge.collect import problem_prompt
from s2t_edge.decode import DecodeStats, decode
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.eval.runner import parse_policies, run_eval
from s2t_edge.parallel import sample_batch, sample_parallel
from s2t_edge.prompt import ChatTemplate
from s2t_edge.reranker import S2TLocal
from s2t_edge.runtime import Models, build_policy, open_models
from tests.conftest import PROBLEMS

PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 10


def open_tiny(model: Path, bundle: Path | str, **kw) -> Models:
    return open_models(str(model), bundle=str(bundle), ctx=512, threads=1, progress=False, **kw)


def run(engine: Engine, prompt: list[int], **kw) -> tuple[list[int], DecodeStats]:
    stats = DecodeStats()
    return [t.id for t in decode(engine, prompt, max_tokens=MAX_TOKENS, stats=stats, **kw)], stats


def plain_greedy(model: Path, prompt_text: str = PROMPT, max_tokens: int = MAX_TOKENS) -> list[int]:
    with Engine(model, n_ctx=512, n_threads=1) as e:
        return [t.id for t in decode(e, e.tokenize(prompt_text), max_tokens=max_tokens)]


class Spy:
    """Records every reranker call (scores, trigger probability)."""

    def __init__(self, sel: S2TLocal) -> None:
        self.calls: list[tuple[np.ndarray, float]] = []
        real = sel.reranker.run

        def run_and_record(*args):
            out = real(*args)
            self.calls.append((out[0].copy(), out[1]))
            return out

        sel.reranker.run = run_and_record


# ---- open_models / build_policy ---------------------------------------------------------------


def test_open_models_with_bundle(bundle_dir: Path, tiny_gguf: Path) -> None:
    models = open_tiny(tiny_gguf, bundle_dir)
    try:
        assert models.slm.hidden_enabled and models.bundle is not None and models.teacher is None
        assert models.bundle.root == bundle_dir and models.slm.path == tiny_gguf
        policy = build_policy(models)
        assert policy.name == "s2t-local" and policy.needs_hidden and policy.k == models.bundle.k
        assert isinstance(policy.trigger, S2TLocal) and policy.trigger is policy.selector
        assert policy.trigger.threshold == models.bundle.threshold
        assert build_policy(models, "greedy").name == "greedy"
    finally:
        models.close()


def test_bundle_runs_on_its_own_gguf(bundle_dir: Path) -> None:
    models = open_models(None, bundle=str(bundle_dir), ctx=256, threads=1, progress=False)
    try:
        assert models.slm.path == bundle_dir / "tiny.gguf"
    finally:
        models.close()


def test_s2t_local_consulted_every_step(bundle_dir: Path, tiny_gguf: Path) -> None:
    models = open_tiny(tiny_gguf, bundle_dir)
    try:
        policy = build_policy(models)
        spy = Spy(policy.trigger)
        prompt = models.slm.tokenize(PROMPT)
        stats = DecodeStats()
        toks = list(decode(models.slm, prompt, max_tokens=MAX_TOKENS, stats=stats, **policy.decode_args()))
        assert len(spy.calls) == stats.steps >= len(toks) > 0
        thr = policy.trigger.threshold
        assert stats.triggers == sum(p >= thr for _, p in spy.calls)
        assert [t.triggered for t in toks] == [p >= thr for _, p in spy.calls[: len(toks)]]
        assert all(0 <= p <= 1 and s.shape == (policy.k,) for s, p in spy.calls)
    finally:
        models.close()


def test_threshold_zero_triggers_every_step(always_bundle: Path, tiny_gguf: Path) -> None:
    assert load_bundle(always_bundle).threshold == 0.0
    models = open_tiny(tiny_gguf, always_bundle)
    try:
        policy = build_policy(models)
        spy = Spy(policy.trigger)
        prompt = models.slm.tokenize(PROMPT)
        stats = DecodeStats()
        toks = list(decode(models.slm, prompt, max_tokens=MAX_TOKENS, stats=stats, **policy.decode_args()))
        assert stats.triggers == stats.steps == len(spy.calls) and all(t.triggered for t in toks)
        # every token is the reranker's best-scored candidate; replay the SLM to check
        models.slm.reset()
        logits = models.slm.load(prompt).copy()
        flips = 0
        for tok, (scores, _) in zip(toks, spy.calls, strict=False):  # + a stop step
            ids = np.argsort(-logits, kind="stable")[: policy.k]
            assert tok.id == int(ids[int(np.argmax(scores))])
            flips += tok.id != int(ids[0])
            logits = models.slm.step(tok.id).copy()
        assert sum(t.flipped for t in toks) == flips
    finally:
        models.close()


def test_bundle_refused_for_other_models(
    bundle_dir: Path, tiny_other_vocab_gguf: Path, tiny_teacher_gguf: Path
) -> None:
    with pytest.raises(S2TError, match="vocabulary"):
        open_tiny(tiny_other_vocab_gguf, bundle_dir)
    with pytest.raises(S2TError, match="was built for"):
        open_tiny(tiny_teacher_gguf, bundle_dir)


def test_no_bundle_is_plain_greedy(tiny_gguf: Path) -> None:
    models = open_tiny(tiny_gguf, "none")
    try:
        assert models.bundle is None and not models.slm.hidden_enabled
        policy = build_policy(models)
        assert policy.name == "greedy"
        ids, stats = run(models.slm, models.slm.tokenize(PROMPT), **policy.decode_args())
        assert ids == plain_greedy(tiny_gguf) and stats.triggers == stats.flips == 0
        with pytest.raises(S2TError, match="needs a bundle"):
            build_policy(models, "s2t-local")
        with pytest.raises(S2TError, match="needs a teacher"):
            build_policy(models, "s2t")
        with pytest.raises(S2TError, match="unknown --policy"):
            build_policy(models, "bogus")
    finally:
        models.close()


def test_teacher_policies(tiny_gguf: Path, tiny_teacher_gguf: Path, tiny_other_vocab_gguf: Path) -> None:
    models = open_models(str(tiny_gguf), bundle="none", teacher=str(tiny_teacher_gguf), ctx=256, threads=1)
    try:
        assert build_policy(models, "s2t").name == "s2t"
        assert build_policy(models, "takeover", trigger="kl", threshold=0.5).name == "takeover/kl"
        with pytest.raises(S2TError, match="needs --threshold"):
            build_policy(models, "s2t", trigger="kl")
        ids, stats = run(models.slm, models.slm.tokenize(PROMPT), **build_policy(models, "s2t").decode_args())
        assert stats.triggers == stats.steps > 0
    finally:
        models.close()
    with pytest.raises(S2TError, match="shared tokenizer"):
        open_models(str(tiny_gguf), bundle="none", teacher=str(tiny_other_vocab_gguf), ctx=256, threads=1)


# ---- parallel sampling ------------------------------------------------------------------------


def test_sample_parallel(tiny_gguf: Path) -> None:
    with Engine(tiny_gguf, n_ctx=512, n_threads=1, n_seq=3) as e:
        prompt = e.tokenize(PROMPT)
        a = sample_parallel(e, prompt, 3, max_tokens=MAX_TOKENS, temperature=1.0, seed=1)
        assert e.n_past == 0  # reset after sampling
        assert len(a) == 3 and all(1 <= len(s) <= MAX_TOKENS for s in a)
        assert all(0 <= t < e.n_vocab and not e.is_eog(t) for s in a for t in s)
        assert sample_parallel(e, prompt, 3, max_tokens=MAX_TOKENS, temperature=1.0, seed=1) == a
        assert sample_parallel(e, prompt, 3, max_tokens=MAX_TOKENS, temperature=1.0, seed=2) != a
        assert len({tuple(s) for s in a}) > 1  # the sequences are sampled independently
        cold = sample_parallel(e, prompt, 1, max_tokens=MAX_TOKENS, temperature=1e-4, seed=3)
    assert cold == [plain_greedy(tiny_gguf)]


def test_sample_parallel_sequences_match_single_sequence_decoding(tiny_gguf: Path) -> None:
    """Forked sequences share the prompt's cache but not each other's tokens: near-greedy
    sampling gives the single-sequence greedy decode in every sequence."""
    with Engine(tiny_gguf, n_ctx=512, n_threads=1, n_seq=2) as e:
        prompt = e.tokenize(PROMPT)
        both = sample_parallel(e, prompt, 2, max_tokens=MAX_TOKENS, temperature=1e-4, seed=0)
    assert both == [plain_greedy(tiny_gguf)] * 2


# ---- eval runner ------------------------------------------------------------------------------


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_run_eval_resume_and_settings(tmp_path: Path, bundle_dir: Path, tiny_gguf: Path, data: Path) -> None:
    out = tmp_path / "eval"
    specs = parse_policies(["greedy", "maj@3", "s2t-local"])
    models = open_tiny(tiny_gguf, bundle_dir, n_seq=3)
    try:
        rows = run_eval(models, data, specs, out, max_tokens=MAX_TOKENS, progress=False)
        assert [r["policy"] for r in rows] == ["greedy", "maj@3", "s2t-local"]
        for r in rows:
            assert r["n"] == len(PROBLEMS) and 0 <= r["correct"] <= r["n"]
            assert r["accuracy"] == r["correct"] / r["n"] and r["ci_lo"] <= r["accuracy"] <= r["ci_hi"]
            assert r["mean_tokens"] > 0 and r["wall_seconds"] > 0
        dirs = {"greedy": out / "greedy", "maj@3": out / "maj_at_3", "s2t-local": out / "s2t-local"}
        first = {name: (d / "results.jsonl").read_text() for name, d in dirs.items()}
        for name, d in dirs.items():
            recs = lines(d / "results.jsonl")
            assert [r["id"] for r in recs] == ["gsm:1", "gsm:2", "gsm:3"] and {r["policy"] for r in recs} == {name}
            assert json.loads((d / "summary.json").read_text())["n"] == len(PROBLEMS)
            assert json.loads((d / "settings.json").read_text())["max_tokens"] == MAX_TOKENS
        for r in lines(dirs["maj@3"] / "results.jsonl"):
            assert len(r["answers"]) == 3 and 0 <= r["votes"] <= 3
            assert (r["pred"] is None) == (r["votes"] == 0)
        assert json.loads((dirs["s2t-local"] / "settings.json").read_text())["bundle"]
        # the greedy record is the plain greedy decode of the problem prompt (no hidden state)
        with Engine(tiny_gguf, n_ctx=512, n_threads=1) as plain:
            ids, _ = run(plain, problem_prompt(plain, ChatTemplate(plain), PROBLEMS[0]["question"]))
            assert lines(dirs["greedy"] / "results.jsonl")[0]["output"] == plain.detokenize(ids)

        again = run_eval(models, data, specs, out, max_tokens=MAX_TOKENS, progress=False)
        assert {name: (d / "results.jsonl").read_text() for name, d in dirs.items()} == first
        assert [r["n"] for r in again] == [len(PROBLEMS)] * 3
        with pytest.raises(S2TError, match="different settings: max_tokens"):
            run_eval(models, data, specs[:1], out, max_tokens=MAX_TOKENS + 1, progress=False)
        with pytest.raises(S2TError, match="needs --teacher"):
            run_eval(models, data, parse_policies(["s2t"]), out, progress=False)
    finally:
        models.close()


def test_run_eval_resumes_partial_run(tmp_path: Path, tiny_gguf: Path, data: Path) -> None:
    models = open_tiny(tiny_gguf, "none")
    try:
        run_eval(models, data, parse_policies(["greedy"]), tmp_path, limit=1, max_tokens=MAX_TOKENS, progress=False)
        full = run_eval(models, data, parse_policies(["greedy"]), tmp_path, max_tokens=MAX_TOKENS, progress=False)
    finally:
        models.close()
    recs = lines(tmp_path / "greedy" / "results.jsonl")
    assert [r["id"] for r in recs] == ["gsm:1", "gsm:2", "gsm:3"] and full[0]["n"] == 3


def test_run_eval_vote_temperature(tmp_path: Path, tiny_gguf: Path, data: Path) -> None:
    """--vote-temperature: each maj@N record is the vote of samples drawn at that temperature (the
    same seeds), kept apart from the default's results; nothing but a finite T > 0 is taken."""
    models = open_tiny(tiny_gguf, "none", n_seq=3)
    try:
        kw = {"limit": 2, "max_tokens": MAX_TOKENS, "progress": False}
        for t in (None, 0.2, 3.0):
            run_eval(models, data, parse_policies(["maj@3"]), tmp_path / f"t{t}", vote_temperature=t, **kw)
        template = ChatTemplate(models.slm)
        by_t = {}
        for t in (None, 0.2, 3.0):
            d = tmp_path / f"t{t}" / "maj_at_3"
            settings = json.loads((d / "settings.json").read_text())
            assert settings.get("vote_temperature") == t  # the default (0.7) adds no key: old runs still resume
            by_t[t] = [r["output"] for r in lines(d / "results.jsonl")]
            for i, r in enumerate(lines(d / "results.jsonl")):
                prompt = problem_prompt(models.slm, template, PROBLEMS[i]["question"])
                kw_t = {} if t is None else {"temperature": t}
                samples = sample_parallel(models.slm, prompt, 3, max_tokens=MAX_TOKENS, seed=i, **kw_t)
                assert r["output"] == models.slm.detokenize(samples[0])
        assert by_t[0.2] != by_t[3.0] and by_t[None] != by_t[3.0]
        with pytest.raises(S2TError, match="different settings: vote_temperature"):
            run_eval(models, data, parse_policies(["maj@3"]), tmp_path / "t0.2", **kw)
        for bad in (0.0, -1.0, float("nan")):
            with pytest.raises(S2TError, match="vote temperature must be a finite number > 0"):
                run_eval(models, data, parse_policies(["maj@3"]), tmp_path / "bad", vote_temperature=bad, **kw)
    finally:
        models.close()
    models = open_tiny(tiny_gguf, "none", n_seq=6)  # --batch 6: both problems' 3 samples in one batch
    try:
        run_eval(models, data, parse_policies(["maj@3"]), tmp_path / "b", vote_temperature=3.0, batch=6, **kw)
        prompts = [problem_prompt(models.slm, ChatTemplate(models.slm), p["question"]) for p in PROBLEMS[:2]]
        ref = sample_batch(models.slm, prompts, 3, max_tokens=MAX_TOKENS, temperature=3.0, seeds=[0, 1])
        want = {i: models.slm.detokenize(samples[0]) for i, samples, _ in ref}
        got = {r["id"]: r["output"] for r in lines(tmp_path / "b" / "maj_at_3" / "results.jsonl")}
        assert got == {"gsm:1": want[0], "gsm:2": want[1]}  # records come in finishing order
    finally:
        models.close()
    args = ["eval", "--data", str(data), "--policy", "maj@3", "--model", str(tiny_gguf), "--limit", "2"]
    args += ["--max-tokens", str(MAX_TOKENS), "--threads", "1", "--out", str(tmp_path / "cli")]
    r = CliRunner().invoke(main, [*args, "--vote-temperature", "0.2"])
    assert r.exit_code == 0, r.output
    assert [x["output"] for x in lines(tmp_path / "cli" / "maj_at_3" / "results.jsonl")] == by_t[0.2]
    r = CliRunner().invoke(main, [*args, "--vote-temperature", "0"])
    assert r.exit_code == 2 and "--vote-temperature" in r.output
    no_vote = [*args[:4], "greedy", *args[5:], "--vote-temperature", "0.2"]
    r = CliRunner().invoke(main, no_vote)
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "error: --vote-temperature is the sampling of maj@N / s2t-local-maj@N: add one of them to --policy"
    ]


def test_parse_policies() -> None:
    assert [s.maj_n for s in parse_policies(["greedy", "maj@8"])] == [None, 8]
    assert parse_policies(["teacher"])[0].needs_teacher
    for bad, msg in (("maj@0", "maj@N"), ("maj@x", "maj@N"), ("best", "unknown policy")):
        with pytest.raises(S2TError, match=msg):
            parse_policies([bad])


# ---- CLI --------------------------------------------------------------------------------------


def test_cli_eval_and_compare(tmp_path: Path, tiny_gguf: Path, data: Path) -> None:
    out = tmp_path / "runs"

    def args(max_tokens: int) -> list[str]:
        return [
            "eval",
            "--data",
            str(data),
            "--policy",
            "greedy",
            "--model",
            str(tiny_gguf),
            "--out",
            str(out),
            "--limit",
            "2",
            "--max-tokens",
            str(max_tokens),
            "--threads",
            "1",
            "--ctx",
            "512",
        ]

    r = CliRunner().invoke(main, [*args(MAX_TOKENS), "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert row["policy"] == "greedy" and row["n"] == 2
    assert len(lines(out / "greedy" / "results.jsonl")) == 2
    r = CliRunner().invoke(main, ["eval", "compare", str(out), "--json"])
    assert r.exit_code == 0, r.output
    (cmp,) = json.loads(r.stdout)
    assert cmp["policy"] == "greedy" and cmp["n"] == cmp["n_common"] == 2
    assert cmp["correct"] == row["correct"]
    r = CliRunner().invoke(main, ["eval", "compare", str(out), "--data", str(data), "--limit", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["n"] == 1  # the first problem of the data file only
    r = CliRunner().invoke(main, ["eval", "compare", str(out), "--limit", "1"])
    assert r.exit_code == 2 and "go together" in r.stderr
    r = CliRunner().invoke(main, args(MAX_TOKENS + 1))
    assert r.exit_code == 1 and "different settings" in r.stderr


def test_cli_bundle_inspect(bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = CliRunner().invoke(main, ["bundle", "inspect", str(bundle_dir)])
    assert r.exit_code == 0, r.output
    assert "verified" in r.stdout and "K=8" in r.stdout
    r = CliRunner().invoke(main, ["bundle", "inspect", str(bundle_dir), "--json"])
    assert json.loads(r.stdout) == load_bundle(bundle_dir).manifest
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST).write_text(json.dumps({**load_bundle(bundle_dir).manifest, "format_version": 99}))
    r = CliRunner().invoke(main, ["bundle", "inspect", str(bad)])
    assert r.exit_code == 1 and "newer" in r.stderr and "verified" not in r.stdout


def test_cli_generate_show_flips(always_bundle: Path, tiny_gguf: Path) -> None:
    """With a bundle whose trigger always fires, generate reports flips and highlights them."""
    from s2t_edge.cli import main

    args = ["generate", PROMPT, "--model", str(tiny_gguf), "--bundle", str(always_bundle), "--max-tokens", "6"]
    out = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert out["policy"] == "s2t-local" and out["stats"]["triggers"] == out["stats"]["steps"]
    flips = out["stats"]["flips"]
    shown = CliRunner().invoke(main, [*args, "--show-flips"], color=True).output
    assert flips > 0 and "\x1b[" in shown


def test_alternative_rule_always_flips(always_bundle: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """Rule "alternative": where the trigger fires the selector never keeps the SLM's top-1."""
    import shutil

    root = tmp_path / "bundle"
    shutil.copytree(always_bundle, root)
    m = json.loads((root / MANIFEST).read_text())
    m["select_rule"] = "alternative"
    (root / MANIFEST).write_text(json.dumps(m))
    models = open_tiny(tiny_gguf, root)
    try:
        policy = build_policy(models)
        toks = list(decode(models.slm, models.slm.tokenize(PROMPT), max_tokens=MAX_TOKENS, **policy.decode_args()))
        assert toks and all(t.flipped for t in toks)
    finally:
        models.close()
