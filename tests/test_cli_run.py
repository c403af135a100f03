"""`generate` and `chat` on the tiny GGUF through click's test runner."""

from __future__ import annotations

import json
import os
import pty
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import s2t_edge.chat
import s2t_edge.cli.run
import s2t_edge.cli.vote
from s2t_edge.cli import main
from s2t_edge.decode import Token, decode
from s2t_edge.engine import Engine
from s2t_edge.policy import greedy
from tests.tiny_gguf import write_tiny_gguf

PROMPT = "Hello world"


def cli(model: Path | str, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, [args[0], "--model", str(model), "--threads", "1", *args[1:]], input=input)


def generate_json(model: Path, *args: str) -> dict:
    r = cli(model, "generate", PROMPT, "--json", "--max-tokens", "8", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def interrupt_after(n: int, once: bool = False):
    """A `decode` that raises KeyboardInterrupt (like Ctrl-C) after yielding `n` tokens."""
    calls = []

    def fake(*args, **kwargs) -> Iterator[Token]:
        calls.append(1)
        for i, tok in enumerate(decode(*args, **kwargs)):
            if i == n and (not once or len(calls) == 1):
                raise KeyboardInterrupt
            yield tok

    return fake


def test_generate_json(tiny_gguf: Path) -> None:
    out = generate_json(tiny_gguf)
    assert set(out) == {"text", "tokens", "stats", "model", "policy"}
    assert out["policy"] == "greedy"  # the default bundle is for the real SLM, not this model
    assert out["model"] == str(tiny_gguf)
    assert isinstance(out["text"], str) and all(isinstance(t, int) for t in out["tokens"])
    stats = out["stats"]
    assert len(out["tokens"]) == stats["steps"] == 8 and stats["finish_reason"] == "length"
    assert stats["prompt_tokens"] > len(PROMPT.split()) and stats["tokens_per_s"] > 0
    assert {"triggers", "flips", "trigger_rate", "flip_rate", "model_s"} <= set(stats)


def test_generate_streams_same_text(tiny_gguf: Path) -> None:
    out = generate_json(tiny_gguf)
    r = cli(tiny_gguf, "generate", PROMPT, "--max-tokens", "8", "--show-stats")
    assert r.exit_code == 0
    # the same text (invalid UTF-8 from random weights may be replaced differently)
    assert r.stdout.replace("\ufffd", "") == out["text"].replace("\ufffd", "") + "\n"
    assert r.stderr.startswith("[8 tokens,") and "finish length" in r.stderr


def test_generate_raw_and_system(tiny_gguf: Path) -> None:
    raw = generate_json(tiny_gguf, "--raw")
    templated = generate_json(tiny_gguf)
    with_system = generate_json(tiny_gguf, "--system", "Be brief.")
    assert raw["stats"]["prompt_tokens"] == 2  # "Hello", " world"
    assert templated["stats"]["prompt_tokens"] > raw["stats"]["prompt_tokens"]
    assert with_system["stats"]["prompt_tokens"] != templated["stats"]["prompt_tokens"]
    r = cli(tiny_gguf, "generate", PROMPT, "--raw", "--system", "x")
    assert r.exit_code == 2 and "--system" in r.stderr


def test_generate_stdin(tiny_gguf: Path) -> None:
    r = cli(tiny_gguf, "generate", "-", "--raw", "--json", "--max-tokens", "2", input=PROMPT)
    assert r.exit_code == 0 and json.loads(r.stdout)["stats"]["prompt_tokens"] == 2


def test_generate_sampling_seed(tiny_gguf: Path) -> None:
    a = generate_json(tiny_gguf, "--temperature", "1.0", "--seed", "3", "--k", "16")
    b = generate_json(tiny_gguf, "--temperature", "1.0", "--seed", "3", "--k", "16")
    assert a["tokens"] == b["tokens"] and a["stats"]["triggers"] == 8
    others = [generate_json(tiny_gguf, "--temperature", "1.0", "--seed", str(s), "--k", "16") for s in (4, 5)]
    assert any(o["tokens"] != a["tokens"] for o in others)  # the seed is used, not ignored


def one_error_line(r: Result, code: int = 1) -> str:
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_bad_models(tmp_path: Path, tiny_gguf: Path) -> None:
    assert "no such file" in one_error_line(cli(tmp_path / "missing.gguf", "generate", "hi"))
    assert "unknown model" in one_error_line(cli("no-such-model", "generate", "hi"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    assert "not a GGUF" in one_error_line(cli(bad, "generate", "hi"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:3000])
    assert "could not load" in one_error_line(cli(cut, "chat", input="hi\n"))


def test_prompt_longer_than_context(tiny_gguf: Path) -> None:
    r = cli(tiny_gguf, "generate", "hello " * 300)
    assert "context overflow" in one_error_line(r)


@pytest.mark.parametrize(
    ("args", "bad"),
    [(["--k", "99"], "--k"), (["--k", "0"], "--k"), (["--temperature", "-1"], "--temperature")],
)
def test_bad_option_values(tiny_gguf: Path, args: list[str], bad: str) -> None:
    r = cli(tiny_gguf, "generate", "hi", *args)
    assert r.exit_code == 2 and f"Invalid value for '{bad}'" in r.stderr


def test_generate_votes_under_a_reranker_bundle(tiny_gguf: Path, always_bundle: Path) -> None:
    """A bundle without an adapter has no adapted SLM to vote with: refused in one line under
    s2t-local, while --policy greedy votes over the base SLM."""
    args = ("generate", PROMPT, "--votes", "2", "--bundle", str(always_bundle), "--max-tokens", "4")
    assert "has no LoRA adapter (--policy greedy)" in one_error_line(cli(tiny_gguf, *args))
    r = cli(tiny_gguf, *args, "--policy", "greedy", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["policy"] == "maj@2"


def test_generate_votes(tiny_gguf: Path) -> None:
    """--votes N: one JSON object with the N samples, their answers and the winner; refused where
    it cannot run, in one line."""
    out = generate_json(tiny_gguf, "--votes", "4", "--seed", "2")
    assert out["policy"] == "maj@4" and len(out["texts"]) == len(out["answers"]) == 4
    assert out["text"] in out["texts"] and out["stats"]["tokens"] <= 4 * 8 and out["stats"]["temperature"] == 0.7
    assert out == generate_json(tiny_gguf, "--votes", "4", "--seed", "2") | {"stats": out["stats"]}
    assert (
        generate_json(tiny_gguf, "--votes", "4", "--seed", "2", "--temperature", "0.3")["stats"]["temperature"] == 0.3
    )
    r = cli(tiny_gguf, "generate", "hello " * 300, "--votes", "4", "--max-tokens", "200")
    assert "do not fit the 256 tokens a sequence holds; lower --max-tokens" in one_error_line(r)
    for bad, flag in (
        (["--show-flips"], "--show-flips"),
        (["--k", "4"], "--k"),
        (["--teacher", str(tiny_gguf)], "--teacher"),
        (["--policy", "s2t"], "--policy s2t / takeover"),
    ):
        r = cli(tiny_gguf, "generate", PROMPT, "--votes", "2", *bad)
        assert r.exit_code == 2 and f"--votes samples the SLM itself (top-k 20, top-p 0.8): not with {flag}" in r.stderr
    r = cli(tiny_gguf, "generate", PROMPT, "--votes", "2", "--temperature", "0")
    assert r.exit_code == 2 and "--temperature must be > 0" in r.stderr
    r = cli(tiny_gguf, "generate", PROMPT, "--votes", "1")
    assert r.exit_code == 2 and "Invalid value for '--votes'" in r.stderr


def test_generate_votes_prints_the_winner(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The winning sample's text on stdout, the vote on stderr; Ctrl-C exits 130 with one line."""
    from s2t_edge.eval.vote import Tally

    texts = ["so \\boxed{4}", "then \\boxed{5}", "\\boxed{5.0}"]
    tally = Tally(texts, ["4", "5", "5.0"], "5", 2, 30, 0)
    monkeypatch.setattr(s2t_edge.cli.vote, "vote", lambda *a, **kw: tally)
    r = cli(tiny_gguf, "generate", PROMPT, "--votes", "3", "--max-tokens", "8", "--show-stats")
    assert r.exit_code == 0 and r.stdout == "then \\boxed{5}\n"
    lines = r.stderr.splitlines()
    assert lines[0] == "[maj@3: 5 won 2 of 3 votes; answers 4, 5, 5.0]" and lines[1].startswith("[30 tokens in ")
    assert generate_json(tiny_gguf, "--votes", "3")["text"] == "then \\boxed{5}"

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(s2t_edge.cli.vote, "vote", interrupted)
    r = cli(tiny_gguf, "generate", PROMPT, "--votes", "3", "--max-tokens", "8")
    assert r.exit_code == 130 and r.stdout == "" and "interrupted: no vote" in r.stderr and "Traceback" not in r.output


def test_generate_ctrl_c(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s2t_edge.cli.run, "decode", interrupt_after(3))
    r = cli(tiny_gguf, "generate", PROMPT, "--show-stats")
    assert r.exit_code == 130 and "Traceback" not in r.output and "Aborted" not in r.output
    assert r.stdout.endswith("\n")
    assert r.stderr.startswith("[") and "finish interrupted" in r.stderr
    r = cli(tiny_gguf, "generate", PROMPT, "--json")
    assert r.exit_code == 130 and len(json.loads(r.stdout)["tokens"]) == 3


def test_ctrl_c_while_loading(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(s2t_edge.cli.run.RunOptions, "load", interrupted)
    for command in ("generate", "chat"):
        r = cli(tiny_gguf, command, *(["hi"] if command == "generate" else []), input="hi\n")
        assert r.exit_code == 130 and "Aborted" not in r.output


def test_chat_through_stdin(tiny_gguf: Path) -> None:
    script = "/help\nHello there\n\n/stats\n/reset\n/stats\n/nope\n/quit\nnever answered\n"
    r = cli(tiny_gguf, "chat", "--max-tokens", "6", "--show-stats", input=script)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "/reset" in out and "/quit" in out  # the help text
    assert ">>>" not in out  # no prompt decoration when stdin is not a tty
    assert "1 turn, 6 tokens" in out and "0 turns, 0 tokens" in out
    assert "(conversation cleared)" in out and "unknown command /nope" in out
    assert r.stderr.count("[6 tokens,") == 1  # one answer, one stats line


def record_sessions(monkeypatch: pytest.MonkeyPatch) -> list[s2t_edge.chat.ChatSession]:
    """The chat sessions the CLI creates from now on, appended as they are made."""
    sessions: list[s2t_edge.chat.ChatSession] = []

    class Recorded(s2t_edge.chat.ChatSession):
        def __post_init__(self) -> None:
            super().__post_init__()
            sessions.append(self)

    monkeypatch.setattr(s2t_edge.cli.run, "ChatSession", Recorded)
    return sessions


def test_chat_eof_and_system(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = record_sessions(monkeypatch)
    r = cli(tiny_gguf, "chat", "--system", "Be brief.", "--max-tokens", "4", input="a\nb\n")
    assert r.exit_code == 0 and r.stdout.count("\n") == 2  # two answers, then EOF
    assert sessions[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in sessions[0].messages[1:]] == ["user", "assistant"] * 2


def test_chat_ctrl_c_keeps_session(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = record_sessions(monkeypatch)
    monkeypatch.setattr(s2t_edge.chat, "decode", interrupt_after(2, once=True))
    r = cli(tiny_gguf, "chat", "--max-tokens", "5", "--show-stats", input="one\ntwo\n/stats\n")
    assert r.exit_code == 0, r.output
    assert "finish interrupted" in r.stderr and "finish length" in r.stderr
    assert "2 turns, " in r.stdout
    roles = [m["role"] for m in sessions[0].messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert sessions[0].messages[1]["content"]  # the partial answer stayed in history


def test_chat_without_template(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "no-template.gguf", chat_template=None)
    assert "no chat template" in one_error_line(cli(path, "chat", input="hi\n"))
    r = cli(path, "generate", PROMPT, "--raw", "--max-tokens", "2")
    assert r.exit_code == 0


def _pty_chat(model: Path) -> tuple[int, int]:
    """Start `chat` on a pseudo-terminal (so Ctrl-C is a real SIGINT); returns (pid, fd)."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "s2t_edge.cli",
                "chat",
                "--model",
                str(model),
                "--threads",
                "1",
                "--max-tokens",
                "4",
            ],
        )
    return pid, fd


def _read_until(fd: int, marker: bytes, timeout: float = 30.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf!r}")
        buf += os.read(fd, 4096)
    return buf


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _ctrl_c(fd: int) -> None:
    """Press Ctrl-C, not within microseconds of the prompt appearing.

    CPython's readline loop only notices a signal that interrupts its select(): one that lands
    between readline printing the prompt and entering select() waits for the next key.
    """
    time.sleep(0.3)
    os.write(fd, b"\x03")


def test_chat_on_a_terminal(tiny_gguf: Path) -> None:
    pid, fd = _pty_chat(tiny_gguf)
    try:
        assert b"/help" in _read_until(fd, b">>> ")
        os.write(fd, b"Hello\n")
        _read_until(fd, b">>> ")  # answered, fresh prompt
        _ctrl_c(fd)  # Ctrl-C at the prompt: a fresh prompt, the session goes on
        assert b"Ctrl-C again" in _read_until(fd, b">>> ")
        os.write(fd, b"/stats\n")
        assert b"1 turn," in _read_until(fd, b">>> ")
        _ctrl_c(fd)  # not twice in a row (a line came in between): a fresh prompt again
        _read_until(fd, b">>> ")
        _ctrl_c(fd)  # twice quickly: leave
        assert _exit_code(pid) == 0
    finally:
        os.close(fd)


def test_chat_on_a_terminal_ctrl_d(tiny_gguf: Path) -> None:
    pid, fd = _pty_chat(tiny_gguf)
    try:
        _read_until(fd, b">>> ")
        time.sleep(0.3)
        os.write(fd, b"\x04")  # Ctrl-D at an empty prompt: EOF
        assert _exit_code(pid) == 0
    finally:
        os.close(fd)


def test_chat_session_totals_and_prefix_reuse(tiny_gguf: Path) -> None:
    with Engine(tiny_gguf, n_ctx=256, n_threads=1) as engine:
        session = s2t_edge.chat.ChatSession(engine, greedy(), max_tokens=3)
        decoded: list[int] = []
        real_decode = engine._decode
        engine._decode = lambda toks, *rest: decoded.extend(toks) or real_decode(toks, *rest)
        turns = []
        for question in ("Hello", "And then?"):
            decoded.clear()
            list(session.send(question))
            turns.append((session.last, len(decoded)))
        (first, n_first), (second, n_second) = turns
        assert n_first >= first.prompt_tokens
        assert n_second < second.prompt_tokens  # the first turn's tokens stayed in the cache
        total = session.total
        assert total.steps == first.steps + second.steps
        assert total.prefill_s == pytest.approx(first.prefill_s + second.prefill_s)
        assert total.tokens_per_s == pytest.approx(total.steps / (total.model_s - total.prefill_s + total.ours_s))


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "hi", "--threads", "0"],
        ["eval", "--data", "x.jsonl", "--policy", "greedy", "--threads", "0"],
        ["collect", "--data", "x.jsonl", "--out", "g", "--gpu-layers", "-1"],
    ],
)
def test_shared_options_validated_everywhere(args: list[str]) -> None:
    """--threads / --gpu-layers are declared once and checked the same way by every command."""
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert "Invalid value for '--threads'" in r.output or "Invalid value for '--gpu-layers'" in r.output
