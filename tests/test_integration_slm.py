"""The real SLM: greedy parity with llama-cpp-python's `Llama`, and the CLI end to end.

Kept short (a few dozen tokens each): the machine running CI is small.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s2t_edge.decode import DecodeStats, decode
from s2t_edge.engine import Engine
from s2t_edge.eval.grading import extract_answer
from tests.llama_ref import reference_llama

pytestmark = pytest.mark.integration

N_CTX = 1024
THREADS = 1  # llama.cpp threads spin at barriers: 2 threads on a busy 2-core box crawl
PROMPTS = ["def fibonacci(n):\n", "The three primary colors are"]
REPO = Path(__file__).resolve().parent.parent


def run_cli(slm_path: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cli_cmd(slm_path, *args)],
        input=input,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=cli_env(),
    )


def cli_cmd(slm_path: Path, command: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "s2t_edge.cli",
        command,
        "--model",
        str(slm_path),
        "--threads",
        str(THREADS),
        "--ctx",
        str(N_CTX),
        *args,
    ]


def cli_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def test_greedy_parity_with_llama_cpp(slm_path: Path) -> None:
    ours = []
    with Engine(slm_path, n_ctx=N_CTX, n_threads=THREADS) as engine:
        for prompt in PROMPTS:
            stats = DecodeStats()
            ids = [t.id for t in decode(engine, engine.tokenize(prompt), max_tokens=32, stats=stats)]
            ours.append((len(engine.tokenize(prompt)), ids, engine.detokenize(ids), stats))
    llm = reference_llama(slm_path, n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS, flash_attn=True)
    try:
        for prompt, (n_prompt, ids, text, stats) in zip(PROMPTS, ours, strict=True):
            out = llm.create_completion(prompt, max_tokens=32, temperature=0.0)
            choice = out["choices"][0]
            assert choice["text"] == text, prompt
            assert out["usage"]["prompt_tokens"] == n_prompt
            assert out["usage"]["completion_tokens"] == len(ids)
            # Llama evaluates every sampled token but the last: compare those ids one by one
            assert list(llm.input_ids[n_prompt : llm.n_tokens]) == ids[: llm.n_tokens - n_prompt]
            assert llm.n_tokens - n_prompt >= len(ids) - 1
            assert choice["finish_reason"] == stats.finish_reason
    finally:
        llm.close()


def test_generate_streams_then_ctrl_c(slm_path: Path) -> None:
    """Tokens reach stdout while the model is still generating; Ctrl-C stops it cleanly."""
    proc = subprocess.Popen(
        cli_cmd(slm_path, "generate", "--raw", "--max-tokens", "200", "--show-stats", "def quicksort(items):\n"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no output within 120 s"
        first = os.read(proc.stdout.fileno(), 4096)
        assert first and proc.poll() is None  # streamed: text before the end of generation
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    text = (first + rest).decode()
    assert "Traceback" not in err.decode() and text.endswith("\n") and len(text) > 2
    assert "finish interrupted" in err.decode()


def test_generate_answers(slm_path: Path) -> None:
    r = run_cli(slm_path, "generate", "--max-tokens", "24", "What is 2 + 2? Reply with a number.")
    assert r.returncode == 0, r.stderr
    assert extract_answer(r.stdout) == "4", r.stdout


def test_generate_json_stats(slm_path: Path) -> None:
    r = run_cli(slm_path, "generate", "--json", "--bundle", "none", "--max-tokens", "12", "Say hello.")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["policy"] == "greedy"
    stats = out["stats"]
    assert 0 < stats["steps"] <= 12 and stats["tokens_per_s"] > 0
    assert stats["prompt_tokens"] > 5 and stats["finish_reason"] in ("stop", "length")
    assert stats["triggers"] == stats["flips"] == 0  # greedy
    assert out["text"].strip() and len(out["tokens"]) in (stats["steps"], stats["steps"] - 1)
    assert out["model"] == str(slm_path)


def test_default_bundle_runs_s2t_local(slm_path: Path) -> None:
    """The shipped bundle is verified against the real SLM and decodes s2t-local with its adapter:
    without a reranker that is greedy over the SLM with the bundle's LoRA on, token for token."""
    from s2t_edge.bundle import default_bundle_path, load_bundle
    from s2t_edge.prompt import ChatTemplate, chat_tokens

    question = "Natalia sold 48 clips in April and half as many in May. How many in total?"
    r = run_cli(slm_path, "generate", "--json", "--max-tokens", "48", question)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    stats = out["stats"]
    assert out["policy"] == "s2t-local" and stats["steps"] > 0
    assert 0 <= stats["flips"] <= stats["triggers"] <= stats["steps"]
    bundle = load_bundle(default_bundle_path())
    if bundle.adapter_path is None or bundle.has_reranker:
        pytest.skip("the default bundle is not an adapter alone: no plain reference to decode against")
    with Engine(slm_path, n_ctx=N_CTX, n_threads=THREADS, lora=bundle.adapter_path) as eng:
        ids = chat_tokens(eng, ChatTemplate(eng), [{"role": "user", "content": question}])
        adapted = [t.id for t in decode(eng, ids, max_tokens=48)]
    assert out["tokens"] == adapted  # (that the adapter changes the SLM: the test below)


def test_generate_votes_with_the_default_bundle(slm_path: Path) -> None:
    """`generate --votes` on the real SLM: the adapted SLM's samples, their answers read and voted."""
    r = run_cli(
        slm_path,
        "generate",
        "--votes",
        "3",
        "--max-tokens",
        "120",
        "--seed",
        "1",
        "What is 2 + 3? Reply with a number.",
    )
    assert r.returncode == 0, r.stderr
    assert "5" in r.stdout and r.stderr.startswith("[s2t-local-maj@3: 5 won ")


def test_chat_two_turns(slm_path: Path) -> None:
    questions = "What is 2 + 2? Reply with just the number.\nAnd 3 + 3?\n/stats\n"
    r = run_cli(slm_path, "chat", "--max-tokens", "16", input=questions)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert re.search(r"\b4\b", r.stdout) and re.search(r"\b6\b", r.stdout), r.stdout
    assert lines[-1].startswith("2 turns,"), r.stdout


def adapter_bundle() -> Path:
    """The bundle whose adapter is tested: the shipped default when it has one, else the pilot
    adapter kept in tests/data (S2T_EDGE_TEST_BUNDLE overrides both)."""
    from s2t_edge.bundle import default_bundle_path, load_bundle

    if os.environ.get("S2T_EDGE_TEST_BUNDLE"):
        return Path(os.environ["S2T_EDGE_TEST_BUNDLE"])
    default = default_bundle_path()
    if default is not None and load_bundle(default).adapter is not None:
        return default
    return REPO / "tests" / "data" / "adapter-pilot"


def test_bundle_adapter_changes_the_slm_as_exported(slm_path: Path) -> None:
    """llama.cpp with the bundle's adapter on the real SLM reproduces the top-1 changes torch + peft
    made at export on the recorded probe (the validation answer the adapter changes most)."""
    from s2t_edge.bundle import load_bundle

    bundle = load_bundle(adapter_bundle())
    assert bundle.adapter is not None, f"{bundle.root}: no adapter in the bundle"
    check = bundle.adapter["check"]
    probe = check["probe"]
    tokens = probe["tokens"]
    with Engine(slm_path, n_ctx=len(tokens) + 64, n_threads=THREADS, lora=bundle.adapter_path) as eng:
        adapted = [int(row.argmax()) for _, row in eng.score(tokens, 0)]
        eng.use_lora(False)
        base = [int(row.argmax()) for _, row in eng.score(tokens, 0)]
    n = len(tokens)
    agree = sum(a == b for a, b in zip(adapted, probe["adapted_top1"])) / n
    assert agree >= check["thresholds"]["top1_agreement"]  # the bar the export held it to
    torch_changed = [i for i in range(n) if probe["adapted_top1"][i] != probe["base_top1"][i]]
    cpp_changed = [i for i in range(n) if adapted[i] != base[i]]
    assert cpp_changed, "the adapter changes no top-1 on its probe"
    # where torch + peft says the adapter moves the top-1, llama.cpp moves it too (most places)
    both = len(set(torch_changed) & set(cpp_changed))
    assert both >= 0.5 * len(torch_changed), (both, torch_changed, cpp_changed)
