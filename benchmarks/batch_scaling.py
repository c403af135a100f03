"""Tokens per second of one batched decode step by the number of sequences (a cache per sequence).

What `label --batch` and `eval --batch` buy on a CPU: a step over B sequences is one matrix
product with B rows, and small B leaves the matmul kernels far from what the cores can compute
(a prefill of one long prompt is the ceiling, printed first).

    python benchmarks/batch_scaling.py [--model NAME] [--seqs 8 16 32 64] [--len 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

from s2t_edge.engine import Engine
from s2t_edge.store import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="Registry name or .gguf (default: the SLM).")
    ap.add_argument("--seqs", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--len", type=int, default=64, help="Prompt tokens each sequence holds before the steps.")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    n = max(args.seqs)
    cells = args.len + args.rounds * len(args.seqs) * args.steps + 64
    e = Engine(resolve_model(args.model), n_ctx=n * cells, n_threads=args.threads, n_seq=n, unified=False)
    prompt = e.tokenize("Hello there, this is a test prompt of some length. " * (args.len // 8 + 1))[: args.len]
    t0 = time.perf_counter()
    for s in range(n):
        e.prefill_seq(prompt, s)
    print(f"{e.path.name}: prefill {n * args.len / (time.perf_counter() - t0):.1f} tok/s ({args.len}-token prompts)")
    pos = [args.len] * n
    for r in range(args.rounds):
        for b in args.seqs:
            seqs = list(range(b))
            t0 = time.perf_counter()
            for _ in range(args.steps):
                e.step_many([100] * b, seqs, pos[:b])
                pos[:b] = [p + 1 for p in pos[:b]]
            dt = (time.perf_counter() - t0) / args.steps
            print(f"round {r + 1}  {b:3d} sequences  {dt:.3f} s/step  {b / dt:6.1f} tok/s")
    e.close()


if __name__ == "__main__":
    main()
