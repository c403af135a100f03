"""Hostile inputs, fuzzed (Hypothesis) and listed: bundle manifests, JSONL problem files, prompts and
CLI values. The invariant everywhere: a clear one-line error and a non-zero exit, or a correct
result; never a traceback, never a native abort, never a result from another run.

Values that reach llama.cpp's context and batch sizing (or its thread pool) run in a subprocess, so
an abort is a failed return code rather than a dead pytest; the rest runs in-process (click's
runner). `tests.hostile.TRIED` counts the inputs tried by class; the count is printed at the end of
the run (BENCHMARKS.md, "Reliability"). `S2T_HOSTILE_SCALE=10` tries ten times as many examples.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from s2t_edge.bundle import MANIFEST, load_bundle
from s2t_edge.decode import decode
from s2t_edge.engine import ContextOverflow, Engine
from s2t_edge.errors import S2TError
from s2t_edge.eval.data import gold_answer, load_problems
from s2t_edge.manifest import MAX_K, NEVER_FIRES
from s2t_edge.policy import greedy
from tests.hostile import TRIED, assert_invariant, cli, cli_proc, refused
from tests.test_bundle import RERANKER_V1

SCALE = int(os.environ.get("S2T_HOSTILE_SCALE", "1"))
settings.register_profile(
    "hostile",
    deadline=None,  # model loads and subprocesses vary with the machine's load
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("S2T_HOSTILE_RANDOM") is None,  # reproducible in CI; random on request
    print_blob=True,
)
settings.load_profile("hostile")


def examples(n: int) -> settings:
    return settings(max_examples=n * SCALE)


@pytest.fixture(scope="module", autouse=True)
def private_store(tmp_path_factory: pytest.TempPathFactory):
    """A store and cache of this module's own (no real model, nothing shared)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("S2T_EDGE_MODELS", str(tmp_path_factory.mktemp("store") / "models"))
    yield
    mp.undo()


# ---- bundle manifests ---------------------------------------------------------------------------

HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 0.5, -0.0, 1e308, -1e308,
    math.nan, math.inf, -math.inf, "", "x", "NaN", "8", "../../etc/passwd", "a/b", "\x00", [], [1], {}, {"a": 1},
]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def key_paths(obj, prefix=()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out += key_paths(v, (*prefix, k))
    return out


def mutate(m: dict, path: tuple, op: str, value) -> None:
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    if op == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@pytest.fixture(scope="module")
def manifest_bundles(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> dict[str, Path]:
    """Copies of the format-1 reranker bundle shipped until adapter 9 and of a tiny adapter bundle
    (format 2), to damage."""
    root = tmp_path_factory.mktemp("manifests")
    out = {"shipped": Path(shutil.copytree(RERANKER_V1, root / "shipped"))}
    pytest.importorskip("peft")
    from tests.test_adapter import adapter_bundle

    out["adapter"] = adapter_bundle(root / "adapter", tiny_gguf)
    return out


def check_loaded_or_refused(root: Path, gguf: Path | None) -> str:
    """Load a bundle: a one-line S2TError, or a bundle whose every value the runtime uses is sane."""
    try:
        b = load_bundle(root)
    except S2TError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return "refused"
    m = b.manifest
    assert 1 <= b.k <= MAX_K and isinstance(b.k, int)
    if b.has_reranker:
        assert math.isfinite(b.threshold) and 0 <= b.threshold <= NEVER_FIRES
        assert b.select_rule in ("best", "alternative") and b.onnx_path.is_file()
    if b.adapter:
        assert math.isfinite(b.adapter_scale) and b.adapter_path.is_file()
    assert isinstance(m["slm"]["vocab_size"], int) and m["slm"]["vocab_size"] > 0
    assert all(isinstance(line, str) for line in b.describe())
    assert len(b.digest) == 64
    if gguf is not None:
        try:
            b.check_slm(gguf, m["slm"]["vocab_size"])
        except S2TError as e:
            assert "\n" not in str(e)
    return "loaded"


@pytest.mark.parametrize("base", ["shipped", "adapter"])
@examples(60)
@given(data=st.data())
def test_mutated_manifest(manifest_bundles: dict[str, Path], tiny_gguf: Path, base: str, data) -> None:
    """1-3 mutations (delete a key, set a hostile value or random JSON) anywhere in a real manifest."""
    root = manifest_bundles[base]
    original = (root / MANIFEST).read_text()
    m = json.loads(original)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = key_paths(m)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["delete", "hostile", "json"]), label="op")
        value = data.draw(st.sampled_from(HOSTILE_VALUES) if op == "hostile" else json_values, label="value")
        mutate(m, path, op, value)
    try:
        (root / MANIFEST).write_text(json.dumps(m, allow_nan=True))
        check_loaded_or_refused(root, tiny_gguf if base == "adapter" else None)
        TRIED["manifest (mutated)"] += 1
    finally:
        (root / MANIFEST).write_text(original)


@examples(30)
@given(doc=json_values | st.binary(max_size=64).map(lambda b: b.decode("latin-1")))
def test_random_manifest_refused(manifest_bundles: dict[str, Path], doc) -> None:
    """Random JSON (or random bytes) as bundle.json: always refused in one line."""
    root = manifest_bundles["shipped"]
    original = (root / MANIFEST).read_bytes()
    try:
        raw = doc.encode("latin-1") if isinstance(doc, str) else json.dumps(doc, allow_nan=True).encode()
        (root / MANIFEST).write_bytes(raw)
        assert check_loaded_or_refused(root, None) == "refused"
        TRIED["manifest (random)"] += 1
    finally:
        (root / MANIFEST).write_bytes(original)


def test_bad_manifest_through_cli(manifest_bundles: dict[str, Path], tiny_gguf: Path, tmp_path: Path) -> None:
    """`bundle inspect` and `generate --bundle` on damaged manifests: one line, exit 1."""
    cases = {
        "nan threshold": lambda m: m.update(threshold=math.nan),
        "negative threshold": lambda m: m.update(threshold=-0.5),
        "k zero": lambda m: m.update(k=0),
        "k string": lambda m: m.update(k="8"),
        "slm missing": lambda m: m.pop("slm"),
        "sha256 short": lambda m: m["slm"].update(sha256="abc"),
        "not an object": lambda m: m.clear(),
        "future format": lambda m: m.update(format_version=99),
    }
    for name, fn in cases.items():
        root = Path(shutil.copytree(manifest_bundles["shipped"], tmp_path / name.replace(" ", "_")))
        m = json.loads((root / MANIFEST).read_text())
        fn(m)
        (root / MANIFEST).write_text(json.dumps(m, allow_nan=True) if m else "[]")
        refused(cli("bundle", "inspect", root), name)
        refused(cli("generate", "hi", "--model", tiny_gguf, "--bundle", root, "--max-tokens", "2"), name)
        TRIED["manifest (CLI)"] += 2


# ---- JSONL problem files ------------------------------------------------------------------------

Q = "Tom has 3 apples and buys 2 more. How many apples?"
BAD_LINES = {  # kind -> raw line (bytes)
    "not UTF-8": b'{"question": "caf\xe9 \xff", "answer": "#### 1"}',
    "not JSON": b'{"question": "x", "answer": ',
    "BOM": '\ufeff{"question": "x", "answer": "1"}'.encode(),
    "array": b"[1, 2, 3]",
    "string": b'"just a string"',
    "number": b"42",
    "null question": json.dumps({"question": None, "answer": "1"}).encode(),
    "object question": json.dumps({"question": {"text": Q}, "answer": "1"}).encode(),
    "list question": json.dumps({"question": [Q], "answer": "1"}).encode(),
    "number question": json.dumps({"question": 7, "answer": "1"}).encode(),
    "empty question": json.dumps({"question": "", "answer": "1"}).encode(),
    "blank question": json.dumps({"question": " \t ", "answer": "1"}).encode(),
    "no question": json.dumps({"q": Q, "answer": "1"}).encode(),
    "no answer": json.dumps({"question": Q}).encode(),
    "null answer": json.dumps({"question": Q, "answer": None}).encode(),
    "bool answer": json.dumps({"question": Q, "answer": True}).encode(),
    "list answer": json.dumps({"question": Q, "answer": [5]}).encode(),
    "bool id": json.dumps({"id": True, "question": Q, "answer": "1"}).encode(),
    "float id": json.dumps({"id": 1.5, "question": Q, "answer": "1"}).encode(),
    "object id": json.dumps({"id": {}, "question": Q, "answer": "1"}).encode(),
}

good_line = st.fixed_dictionaries(
    {
        "question": st.text(min_size=1, max_size=40).filter(str.strip),
        "answer": st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=False, allow_infinity=False)),
    },
    optional={"id": st.one_of(st.integers(0, 3), st.sampled_from(["0", "1", "a", "gsm:2"]))},
)
huge_line = st.just({"question": "word " * 200_000, "answer": "#### 1"})  # a 1 MB line, valid
line = st.one_of(
    good_line.map(lambda d: ("good", d)),
    huge_line.map(lambda d: ("good", d)),
    st.sampled_from(sorted(BAD_LINES)).map(lambda k: ("bad", k)),
    st.just(("blank", None)),
)


def render(kind: str, value) -> bytes:
    if kind == "good":
        return json.dumps(value).encode()
    return BAD_LINES[value] if kind == "bad" else b"   "


def expected(lines: list[tuple[str, object]], stem: str) -> tuple[list[tuple[int, dict]], list[int]]:
    """The oracle: (good problems as (line number, record), line numbers of bad or duplicate lines)."""
    good, bad, seen = [], [], set()
    for no, (kind, value) in enumerate(lines, start=1):
        if kind == "blank":
            continue
        if kind == "bad":
            bad.append(no)
            continue
        pid = str(value["id"]) if "id" in value else f"{stem}:{no}"
        if pid in seen:
            bad.append(no)
            continue
        seen.add(pid)
        good.append((no, value))
    return good, bad


@examples(80)
@given(lines=st.lists(line, max_size=8), skip_bad=st.booleans())
def test_jsonl_files(tmp_path_factory: pytest.TempPathFactory, lines, skip_bad: bool) -> None:
    """Random mixes of good, bad, blank, duplicate and huge lines against an oracle."""
    path = tmp_path_factory.mktemp("jsonl") / "gsm.jsonl"
    path.write_bytes(b"".join(render(*x) + b"\n" for x in lines))
    good, bad = expected(lines, path.stem)
    TRIED["JSONL file"] += 1
    if (bad and not skip_bad) or not good:
        with pytest.raises(S2TError) as e:
            load_problems(path, skip_bad=skip_bad)
        msg = str(e.value)
        assert "\n" not in msg
        if bad and not skip_bad:
            assert f"{path.name}:{bad[0]}:" in msg  # the first bad line, named
        else:
            assert "no problems" in msg
        return
    problems, skipped = load_problems(path, skip_bad=skip_bad)
    assert skipped == (len(bad) if skip_bad else 0)
    assert [p.question for p in problems] == [v["question"] for _, v in good]
    assert [p.gold for p in problems] == [gold_answer(str(v["answer"])) for _, v in good]
    assert [p.index for p in problems] == list(range(len(good)))
    assert len({p.id for p in problems}) == len(problems)


@pytest.mark.parametrize("kind", sorted(BAD_LINES) + ["duplicate id", "empty file", "only blank lines"])
def test_bad_data_through_eval_cli(tmp_path: Path, tiny_gguf: Path, kind: str) -> None:
    """eval refuses a bad file in one line naming the line, before any model loads."""
    good = json.dumps({"id": 1, "question": Q, "answer": "#### 5"}).encode()
    body = {"duplicate id": [good, good], "empty file": [], "only blank lines": [b"", b"  "]}.get(
        kind, [good, BAD_LINES.get(kind, b"")]
    )
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"".join(x + b"\n" for x in body))
    r = cli(
        "eval", "--data", data, "--model", tiny_gguf, "--bundle", "none", "--policy", "greedy", "--out", tmp_path / "o"
    )
    line = refused(r, kind)
    assert ("d.jsonl:2" in line) if body[1:] and kind != "only blank lines" else ("no problems" in line)
    assert not (tmp_path / "o").exists()  # refused before anything was written
    TRIED["JSONL (eval CLI)"] += 1


def test_eval_skip_bad_counts_everything(tmp_path: Path, tiny_gguf: Path) -> None:
    """--skip-bad: bad lines, a duplicate and a question longer than the context are skipped and
    counted; n is the problems that ran; a rerun adds nothing; a policy named twice runs once."""
    rows = [json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}).encode() for i in range(3)]
    rows += [BAD_LINES["not UTF-8"], BAD_LINES["null question"], rows[0].replace(b"{", b'{"id": 9, ', 1)]
    rows += [
        rows[1].replace(b"{", b'{"id": 9, ', 1),
        json.dumps({"question": "many words " * 200, "answer": "1"}).encode(),
    ]
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"".join(x + b"\n" for x in rows))
    args = [
        "eval",
        "--data",
        data,
        "--model",
        tiny_gguf,
        "--bundle",
        "none",
        "--policy",
        "greedy,greedy",
        "--threads",
        "1",
    ]
    args += ["--max-tokens", "4", "--out", tmp_path / "o", "--json"]
    line = refused(cli(*args), "without --skip-bad")
    assert "d.jsonl:4" in line
    for _ in range(2):
        r = assert_invariant(cli(*args, "--skip-bad"))
        assert r.ok, r.stderr
        (summary,) = json.loads(r.stdout)  # --json: stdout is the JSON alone
        assert summary["n"] == 4 and summary["skipped"] == 4  # 3 bad lines (one duplicate), 1 too long
    ids = [json.loads(x)["id"] for x in (tmp_path / "o" / "greedy" / "results.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 4
    TRIED["JSONL (eval CLI)"] += 3


# ---- prompts ------------------------------------------------------------------------------------

surrogates = st.sampled_from(["\udc80", "\udcff", "\ud800", "\udfff"])  # undecodable argv / stdin bytes
prompt_text = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(st.characters(), surrogates), max_size=30).map("".join),
    st.sampled_from(["", " ", "\n", "\x00", "<|im_end|>", "<|im_start|>user\n", "<|endoftext|>" * 3]),
    st.integers(300, 3000).map(lambda n: "long " * n),  # longer than the tiny model's 256 tokens
)


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path) -> Engine:
    with Engine(tiny_gguf, n_ctx=256, n_threads=1) as e:
        yield e


@examples(120)
@given(text=prompt_text)
def test_prompts_through_the_library(engine: Engine, text: str) -> None:
    """tokenize + decode: ids in the vocabulary and at most max_tokens, or a one-line S2TError."""
    TRIED["prompt (library)"] += 1
    bad_utf8 = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    try:
        ids = engine.tokenize(text)
    except S2TError as e:
        assert bad_utf8 and "not valid UTF-8" in str(e)
        return
    assert not bad_utf8 and all(0 <= i < engine.n_vocab for i in ids)
    try:
        out = [t.id for t in decode(engine, ids, max_tokens=3, **greedy(4).decode_args())]
    except ContextOverflow as e:
        assert len(ids) >= engine.n_ctx_seq and "raise --ctx" in str(e)
        return
    except S2TError as e:
        assert not ids and "empty prompt" in str(e)
        return
    assert 0 < len(ids) < engine.n_ctx_seq and len(out) <= 3 and all(0 <= i < engine.n_vocab for i in out)


@examples(15)
@given(text=prompt_text, raw=st.booleans())
def test_prompts_through_generate(tiny_gguf: Path, text: str, raw: bool) -> None:
    """`generate PROMPT`: JSON with at most --max-tokens tokens, or one line and exit 1."""
    TRIED["prompt (generate)"] += 1
    args = ["generate", text, "--model", tiny_gguf, "--bundle", "none", "--threads", "1", "--max-tokens", "3", "--json"]
    r = assert_invariant(cli(*args, *(["--raw"] if raw else [])))
    if r.ok:
        out = json.loads(r.stdout)
        assert len(out["tokens"]) == out["stats"]["steps"] <= 3
    else:
        assert any(s in r.stderr for s in ("not valid UTF-8", "context overflow", "empty prompt")), r.stderr


def test_prompts_from_stdin_and_chat(tiny_gguf: Path) -> None:
    """Real stdin (subprocess): invalid UTF-8 to `generate -`, a bad line in chat, closed stdin."""
    base = ["--model", tiny_gguf, "--bundle", "none", "--threads", "1", "--max-tokens", "3"]
    cases = [
        (["generate", "-", *base], b"caf\xe9 \xff\xfe\n", "refused", "not valid UTF-8"),
        (["generate", "-", "--raw", *base], b"", "refused", "empty prompt"),
        (["generate", "-", *base, "--ctx", "16"], b"long " * 400, "refused", "context overflow"),
        (["chat", *base], b"hello\n\xff\xfe bad\n" + b"long " * 400 + b"\nagain\n/stats\n", "ok", "2 turns"),
        (["chat", *base], None, "ok", ""),
        (["generate", "-", *base], None, "refused", "error: "),
    ]
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda c: cli_proc(*c[0], input=c[1], stdin_closed=c[1] is None), cases))
    for (args, stdin, want, text), r in zip(cases, runs):
        what = f"{args[0]} stdin={stdin[:20] if stdin else 'closed'!r}"
        if want == "ok":
            assert assert_invariant(r, what).ok, r.stderr
            assert text in r.stdout, r.stdout
        else:
            refused(r, what, text)
        TRIED["prompt (stdin, chat)"] += 1
    chat = runs[3]
    assert "not valid UTF-8" in chat.stderr and "context overflow" in chat.stderr  # both refused, chat went on


# ---- CLI values ---------------------------------------------------------------------------------

NUMBERS = ["0", "-1", "-0", "1", "nan", "NaN", "inf", "-inf", "1e308", "1e-320", "2147483648", "9223372036854775808"]
NUMBERS += ["99999999999999999999999", "0x10", "1.5", "", "abc"]


@example(option="--temperature", value="1e-320")  # was a NaN traceback in sampling
@example(option="--temperature", value="nan")  # was greedy, silently
@example(option="--seed", value="-1")  # was a numpy traceback
@examples(40)
@given(
    option=st.sampled_from(["--k", "--max-tokens", "--temperature", "--seed", "--ctx"]), value=st.sampled_from(NUMBERS)
)
def test_generate_values(tiny_gguf: Path, option: str, value: str) -> None:
    """One hostile value for one `generate` option (in-process: these stop at click or Python, and a
    --ctx is capped at the tiny model's 256 before llama.cpp sees it)."""
    TRIED["CLI value (generate)"] += 1
    args = ["generate", "2+2?", "--model", tiny_gguf, "--bundle", "none", "--threads", "1", "--json", "--seed", "1"]
    if option != "--max-tokens":
        args += ["--max-tokens", "3"]
    if option == "--seed":  # a seed is used by sampling only
        args += ["--temperature", "0.7"]
    r = assert_invariant(cli(*args, option, value), f"{option} {value}")
    if r.ok:
        out = json.loads(r.stdout)
        n = len(out["tokens"])
        assert n == out["stats"]["steps"] and out["stats"]["finish_reason"] in ("stop", "length")
        assert n <= (int(float(value)) if option == "--max-tokens" else 3)
        if option == "--temperature":
            assert math.isfinite(float(value)), f"--temperature {value} accepted"


@examples(30)
@given(
    option=st.sampled_from(["--votes", "--max-tokens", "--temperature", "--seed", "--ctx"]),
    value=st.sampled_from(NUMBERS),
)
def test_generate_votes_values(tiny_gguf: Path, option: str, value: str) -> None:
    """One hostile value for one option of `generate --votes`: N samples voted, or one line."""
    TRIED["CLI value (generate --votes)"] += 1
    args = ["generate", "2+2?", "--model", tiny_gguf, "--bundle", "none", "--threads", "1", "--json", "--seed", "1"]
    if option != "--max-tokens":
        args += ["--max-tokens", "3"]
    if option != "--votes":
        args += ["--votes", "3"]
    r = assert_invariant(cli(*args, option, value), f"--votes with {option} {value}")
    if r.ok:
        out = json.loads(r.stdout)
        n = int(value) if option == "--votes" else 3
        cap = int(float(value)) if option == "--max-tokens" else 3
        assert len(out["texts"]) == len(out["answers"]) == n and out["stats"]["tokens"] <= n * cap
        assert out["text"] in out["texts"] and math.isfinite(out["stats"]["temperature"])
        assert out["stats"]["temperature"] > 0


@examples(20)
@given(trigger=st.sampled_from(["kl", "entropy"]), value=st.sampled_from(NUMBERS))
def test_threshold_values(tiny_gguf: Path, tiny_teacher_gguf: Path, trigger: str, value: str) -> None:
    """--threshold of a kl / entropy trigger: finite and >= 0, or refused (NaN never fires,
    a negative value fires at every step)."""
    TRIED["CLI value (threshold)"] += 1
    args = ["generate", "2+2?", "--model", tiny_gguf, "--bundle", "none", "--teacher", tiny_teacher_gguf, "--json"]
    args += ["--policy", "s2t", "--trigger", trigger, "--threshold", value, "--max-tokens", "3", "--threads", "1"]
    r = assert_invariant(cli(*args), f"--threshold {value}")
    if r.ok:
        assert math.isfinite(float(value)) and float(value) >= 0, f"--threshold {value} accepted"
        assert json.loads(r.stdout)["policy"] == f"s2t/{trigger}"


def test_pipeline_values_in_process(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    """Values click or the library refuses before any model work: eval / collect / label / train."""
    models = ["--model", tiny_gguf, "--bundle", "none"]
    pair = ["--slm", tiny_gguf, "--teacher", tiny_teacher_gguf, "--data", data]
    cases = []
    for opt, vals in {
        "--k": ["0", "-1", "33", "nan"],
        "--max-tokens": ["0", "-5", "nan"],
        "--batch": ["0", "-1", "65", "1e3"],
        "--seed": ["-1", "nan"],
        "--threads": ["0", "-2", "nan"],
        "--ctx": ["0", "-1", "nan"],
    }.items():
        cases += [["eval", "--data", data, *models, "--policy", "greedy", opt, v] for v in vals]
    cases += [["eval", "--data", data, *models, "--policy", p] for p in ("maj@0", "maj@-1", "maj@nan", "maj@", "bogus")]
    cases += [["eval", "--data", data, *models, "--policy", "greedy", "--limit", v] for v in ("0", "-1")]
    for opt, vals in {"--k": ["0", "33"], "--max-tokens": ["0"], "--ctx": ["0", "-1"], "--limit": ["0", "-3"]}.items():
        cases += [["collect", *pair, opt, v] for v in vals]
    for opt, vals in {
        "--k": ["0", "33"],
        "--max-tokens": ["0"],
        "--batch": ["0", "65"],
        "--limit": ["0", "-3"],
    }.items():
        cases += [["label", *pair, opt, v] for v in vals]
    for i, args in enumerate(cases):
        refused(cli(*args, "--out", tmp_path / f"o{i}"), " ".join(map(str, args[-2:])))
        TRIED["CLI value (eval, collect, label)"] += 1
    # an --out that is a file
    (tmp_path / "file").write_text("x")
    for args in (["eval", "--data", data, *models, "--policy", "greedy"], ["collect", *pair], ["label", *pair]):
        refused(cli(*args, "--out", tmp_path / "file", "--max-tokens", "2", "--threads", "1"), f"{args[0]} --out file")
        TRIED["CLI value (eval, collect, label)"] += 1


SUBPROCESS_CASES = [  # (args after the command, must it succeed?) — values that size llama.cpp
    (["generate", "2+2?", "--ctx", "1"], True),
    (["generate", "2+2?", "--ctx", "16"], True),
    (["generate", "2+2?", "--ctx", "0"], True),
    (["generate", "2+2?", "--ctx", "4294967297"], True),
    (["generate", "2+2?", "--ctx", "9223372036854775808"], True),
    (["generate", "2+2?", "--threads", "513"], False),
    (["generate", "2+2?", "--threads", "100000"], False),
    (["generate", "2+2?", "--threads", "9223372036854775808"], False),
    (["generate", "long " * 400, "--ctx", "16"], False),
    (["generate", "2+2?", "--max-tokens", "100000", "--ctx", "1"], True),
    (["eval", "--policy", "greedy", "--ctx", "1"], True),
    (["eval", "--policy", "greedy", "--ctx", "1", "--batch", "64"], None),
    (["eval", "--policy", "greedy", "--ctx", "4294967297", "--batch", "64"], True),
    (["eval", "--policy", "maj@8", "--ctx", "1", "--batch", "8"], None),
    (["eval", "--policy", "greedy", "--batch", "64", "--max-tokens", "100000"], True),
    (["eval", "--policy", "greedy", "--threads", "100000"], False),
    (["collect", "--ctx", "1"], None),
    (["collect", "--ctx", "4294967297", "--max-tokens", "100000"], True),
    (["collect", "--threads", "100000"], False),
    (["label", "--batch", "64"], True),
    (["label", "--max-tokens", "100000"], False),
    (["label", "--threads", "100000"], False),
]


def test_values_that_reach_llama_cpp(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> None:
    """--ctx / --batch / --threads / --max-tokens that size llama.cpp's context, batch and threads,
    in subprocesses: a correct run or one line and exit 1, never a signal."""

    def run(i_case):
        i, (args, _) = i_case
        cmd, rest = args[0], args[1:]
        if cmd == "generate":
            extra = ["--model", tiny_gguf, "--bundle", "none", "--json", "--max-tokens", "4"]
        elif cmd == "eval":
            extra = ["--data", data, "--model", tiny_gguf, "--bundle", "none", "--max-tokens", "4", "--json"]
        else:
            extra = [
                "--slm",
                tiny_gguf,
                "--teacher",
                tiny_teacher_gguf,
                "--data",
                data,
                "--max-tokens",
                "4",
                "--k",
                "4",
            ]
        if cmd != "generate":
            extra += ["--out", tmp_path / f"o{i}", "--limit", "2"]
        if "--threads" not in rest:
            extra += ["--threads", "1"]
        # the case's own values come last: click keeps the last of a repeated option
        return cli_proc(cmd, *extra, *rest)

    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(run, enumerate(SUBPROCESS_CASES)))
    for (args, must), r in zip(SUBPROCESS_CASES, runs):
        what = " ".join(a if len(a) < 30 else a[:20] + "…" for a in args)
        assert_invariant(r, what)
        if must is True:
            assert r.ok, f"{what}: {r.stderr[-500:]}"
        elif must is False:
            refused(r, what)
        if r.ok and args[0] == "generate":
            out = json.loads(r.stdout)
            cap = int(args[args.index("--max-tokens") + 1]) if "--max-tokens" in args else 4
            assert len(out["tokens"]) == out["stats"]["steps"] <= cap
        TRIED["CLI value (subprocess: ctx, batch, threads)"] += 1
