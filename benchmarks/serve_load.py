"""Load on `s2t-edge serve`: the same requests one after another, then from 4 and 8 clients at once.

Starts the server on a free loopback port (or uses `--url`, which must be a loopback address),
sends `--requests` streamed chat requests per round, split over C concurrent clients (C=1 is the
sequential baseline), and reports tokens/s over the round's wall time, p50/p95 latency and time to
first token; every request must be answered (status 200, a finish reason, [DONE]). It also times
the first token of the decode loop in-process (what `generate` does after loading) against the
first token from the idle server, alternating, on the same prompt. Bounded: a fixed number of
requests, each with a timeout, and the server is stopped at the end.

    python benchmarks/serve_load.py --threads 1 [--requests 16 --max-tokens 64 --clients 1,4,8]
    python benchmarks/serve_load.py --threads 1 --engine-only     # the engine's own batching gain, for scale
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from http.client import HTTPConnection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Explain what a hash table is and when to use one.",
    "Write a Python function that checks whether a string is a palindrome.",
    "A train travels 120 km in 1.5 hours. What is its average speed? Explain.",
    "What are the differences between a list and a tuple in Python?",
    "Describe how binary search works, step by step.",
    "Tom has 3 boxes of 12 pencils and gives away 7 pencils. How many are left?",
    "Write a SQL query that counts the orders per customer.",
    "What does the 'yield' keyword do in Python?",
]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    main = "import sys; from s2t_edge.cli import main; sys.argv[0] = 's2t-edge'; main()"
    cmd = [sys.executable, "-c", main, "serve", "--port", "0", "--parallel", str(args.parallel)]
    cmd += ["--threads", str(args.threads), "--ctx", str(args.ctx), "--queue", str(args.requests)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
            if "http://" in line:
                print(line.strip(), flush=True)
                return proc, re.search(r"http://\S+", line).group(0)
    proc.kill()
    raise SystemExit("the server did not start")


def one_request(url: str, question: str, max_tokens: int, timeout: float) -> dict:
    """One streamed chat request: latency, time to first token, completion tokens, complete or not."""
    u = urllib.parse.urlparse(url)
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    out = {"status": 0, "ttft": None, "latency": None, "tokens": 0, "finish": None, "done": False}
    conn = HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out["status"] = resp.status
        for raw in iter(resp.readline, b""):
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                out["done"] = True
                break
            msg = json.loads(data)
            if msg.get("usage"):
                out["tokens"] = msg["usage"]["completion_tokens"]
            for ch in msg.get("choices", []):
                if ch["delta"].get("content") and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - t0
                if ch.get("finish_reason"):
                    out["finish"] = ch["finish_reason"]
    except OSError as e:
        out["error"] = str(e)
    finally:
        conn.close()
    out["latency"] = time.perf_counter() - t0
    return out


def run_round(url: str, clients: int, n: int, max_tokens: int, timeout: float) -> tuple[list[dict], float]:
    """`n` requests shared by `clients` threads, each sending its next request when one ends."""
    todo = list(range(n))[::-1]
    lock = threading.Lock()
    results: list[dict] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            r = one_request(url, QUESTIONS[i % len(QUESTIONS)], max_tokens, timeout)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def ttft_side_by_side(args: argparse.Namespace, url: str, rounds: int) -> tuple[float, float]:
    """Median first-token time: the decode loop in-process vs the idle server, alternating."""
    from s2t_edge.decode import decode
    from s2t_edge.prompt import ChatTemplate, chat_tokens
    from s2t_edge.runtime import build_policy, open_models

    models = open_models(args.model, ctx=args.ctx, threads=args.threads, progress=False)
    try:
        policy = build_policy(models)
        e = models.slm
        ids = chat_tokens(e, ChatTemplate(e), [{"role": "user", "content": QUESTIONS[0]}])
        local, served = [], []
        for _ in range(rounds):
            e.reset()  # no prefix reuse: the server prefills every request in full
            t0 = time.perf_counter()
            gen = decode(e, ids, max_tokens=1, **policy.decode_args())
            next(gen)
            local.append(time.perf_counter() - t0)
            gen.close()
            served.append(one_request(url, QUESTIONS[0], 1, args.timeout)["ttft"])
    finally:
        models.close()
    return statistics.median(local), statistics.median(served)


def engine_ceiling(args: argparse.Namespace, sizes: list[int], steps: int = 6, rounds: int = 2) -> None:
    """What batching can give on this machine right now: the engine alone, one `step_many` over
    1, 4, 8 sequences (hidden state on, as for S2T-LOCAL), sizes alternated."""
    from s2t_edge.engine import Engine
    from s2t_edge.store import resolve_model

    e = Engine(resolve_model(args.model), n_ctx=max(sizes) * 256, n_threads=args.threads, n_seq=max(sizes), hidden=True)
    try:
        p = e.tokenize("Hello there, this is a test prompt.")
        for s in range(max(sizes)):
            e.prefill_seq(p, s)
        pos = [len(p)] * max(sizes)
        best: dict[int, float] = {}
        for _ in range(rounds):
            for n in sizes:
                t0 = time.perf_counter()
                for _ in range(steps):
                    e.step_many([100] * n, list(range(n)), pos[:n])
                    pos[:n] = [x + 1 for x in pos[:n]]
                best[n] = min(best.get(n, float("inf")), (time.perf_counter() - t0) / steps)
        for n in sizes:
            print(
                f"engine alone, {n} sequence(s): {best[n] * 1000:.0f} ms/step, {n / best[n]:.1f} tok/s, "
                f"{n / best[n] / (1 / best[sizes[0]]):.2f}x",
                flush=True,
            )
    finally:
        e.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--url", default=None, help="a running server on a loopback address")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--ttft-rounds", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--engine-only", action="store_true", help="only the engine's own batched step cost")
    args = ap.parse_args()
    if args.engine_only:
        engine_ceiling(args, [int(x) for x in args.clients.split(",")])
        return
    proc = None
    if args.url:
        host = urllib.parse.urlparse(args.url).hostname or ""
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise SystemExit("--url must be a loopback address")
        url = args.url
    else:
        proc, url = start_server(args)
    try:
        one_request(url, QUESTIONS[0], 4, args.timeout)  # warm-up
        rows = []
        for c in [int(x) for x in args.clients.split(",")]:
            res, wall = run_round(url, c, args.requests, args.max_tokens, args.timeout)
            ok = [r for r in res if r["status"] == 200 and r["done"] and r["finish"]]
            tokens = sum(r["tokens"] for r in ok)
            rows.append((c, len(ok), len(res), tokens, tokens / wall, wall, res))
            lat = [r["latency"] for r in ok]
            ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
            print(
                f"clients {c}: {len(ok)}/{args.requests} answered, {tokens} tokens in {wall:.1f} s = "
                f"{tokens / wall:.1f} tok/s, latency p50 {pct(lat, 0.5):.2f} s p95 {pct(lat, 0.95):.2f} s, "
                f"first token p50 {pct(ttft, 0.5):.2f} s",
                flush=True,
            )
            if len(ok) != args.requests:
                print(f"  LOST: {[r for r in res if r not in ok]}", flush=True)
        base = rows[0][4]
        for c, _, _, _, tps, _, _ in rows:
            print(f"  {c} client(s): {tps / base:.2f}x the tokens/s of {rows[0][0]} client(s)")
        local, served = ttft_side_by_side(args, url, args.ttft_rounds)
        print(
            f"time to first token, idle, median of {args.ttft_rounds}: decode loop in-process {local * 1000:.0f} ms, "
            f"server {served * 1000:.0f} ms ({served / local:.2f}x)",
            flush=True,
        )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
