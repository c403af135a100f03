"""Shared helpers of the hostile-input suites (test_hostile, test_kill_resume): the invariant check,
CLI runners in-process and in a subprocess, and a per-class counter of the hostile inputs tried.

The invariant: a clear one-line error (`error: ...`, or click's `Error: ...` usage line) and a
non-zero exit, or a correct result (exit 0, checked by the caller); never a traceback, never a
native abort (a subprocess dying of a signal shows as a negative return code).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from s2t_edge.cli import main

REPO = Path(__file__).resolve().parent.parent
TRIED: Counter[str] = Counter()  # hostile inputs tried this run, by class (reported at the end)


@dataclass
class Run:
    """The outcome of one CLI invocation, in-process or not."""

    code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0


def cli(*args: str, input: str | bytes | None = None) -> Run:
    """`s2t-edge ARGS` in-process (click's runner): for values that cannot reach native code."""
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    if r.exception is not None and not isinstance(r.exception, SystemExit):  # an uncaught exception
        import traceback

        tb = "".join(traceback.format_exception(r.exception))
        return Run(99, r.stdout, r.stderr + "\nTraceback (uncaught in-process)\n" + tb)
    return Run(r.exit_code, r.stdout, r.stderr)


def cli_proc(*args: str, input: bytes | None = None, timeout: float = 120, stdin_closed: bool = False) -> Run:
    """`s2t-edge ARGS` in a subprocess: for values that reach llama.cpp, so an abort is a return code."""
    cmd = [sys.executable, "-c", "from s2t_edge.cli import main; main()", *[str(a) for a in args]]
    env = {**os.environ, "PYTHONFAULTHANDLER": ""}
    if stdin_closed:  # fd 0 closed, as `cmd <&-` in a shell
        p = subprocess.run(
            ["sh", "-c", 'exec "$@" <&-', "sh", *cmd], capture_output=True, timeout=timeout, cwd=REPO, env=env
        )
    else:
        p = subprocess.run(cmd, input=input or b"", capture_output=True, timeout=timeout, cwd=REPO, env=env)
    return Run(p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"))


def assert_invariant(r: Run, what: str = "") -> Run:
    """A correct exit (the caller checks the result) or a clean one-line refusal; never a traceback
    or a signal. Returns `r` for the caller's result checks."""
    where = f"{what}: " if what else ""
    assert r.code >= 0, f"{where}killed by signal {-r.code} (native abort)\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr + r.stdout, f"{where}traceback\n{r.stderr[-3000:]}"
    if r.code != 0:
        assert r.code in (1, 2), f"{where}exit {r.code}\n{r.stderr[-2000:]}"
        last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:]
        assert last and last[0].startswith(("error: ", "Error: ")), f"{where}no one-line error\n{r.stderr[-2000:]}"
    return r


def refused(r: Run, what: str = "", match: str | None = None) -> str:
    """Assert a clean refusal (and that `match` is in its message); returns the error line."""
    assert_invariant(r, what)
    assert r.code != 0, f"{what}: accepted, expected a refusal\n{r.stdout[-1000:]}"
    line = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    if match:
        assert match in line, f"{what}: {line!r} does not mention {match!r}"
    return line


def interrupt_on_call(monkeypatch, owner: object, name: str, n: int) -> None:
    """Make `owner.name` raise KeyboardInterrupt on its n-th call (a Ctrl-C half-way through a run)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def dies(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, dies)
