"""One batched step over per-sequence caches, its sequences in ascending order or not.

With `unified=False` (a cache per sequence: `label`, `eval --batch`) llama.cpp cuts a batch into
one ubatch per run of consecutive sequence ids *in the batch's order*, and every ubatch reads all
the weights again. A continuous batch refills a finished slot and, before session 38, fed that
slot's token last: after the first refills a step was no longer one ubatch. `Engine.step_many` now
decodes in ascending ids whatever order it is given, so this times the raw decode (`Engine._decode`)
of one step of 16 sequences in three orders, alternating, on the labelling teacher (or `--model`).

    python benchmarks/batch_order.py [--model qwen2.5-coder-1.5b-instruct-q4_k_m] [--threads 2 --rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from s2t_edge.engine import Engine
from s2t_edge.store import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct-q4_k_m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    n = args.seqs
    orders = {
        "ascending": list(range(n)),
        "one slot refilled (last)": [*range(n // 3), *range(n // 3 + 1, n), n // 3],
        "shuffled": random.Random(0).sample(range(n), n),
    }
    with Engine(resolve_model(args.model), n_ctx=n * 1024, n_threads=args.threads, n_seq=n, unified=False) as e:
        prompt = e.tokenize("<|im_start|>user\nA train travels 120 km in 1.5 hours. What is its speed?<|im_end|>\n")
        for s in range(n):
            e.prefill_seq(prompt, s)
        pos, times = len(prompt), {k: [] for k in orders}
        for _ in range(args.rounds):
            for name, seqs in orders.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    e._decode([prompt[-1]] * n, [pos] * n, [True] * n, seqs)
                    pos += 1
                times[name].append((time.perf_counter() - t0) / args.steps)
        base = statistics.median(times["ascending"])
        print(
            f"{args.model}: {n} sequences, {args.threads} threads, median of {args.rounds} rounds of {args.steps} steps"
        )
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"  {name:26s} {m:.3f} s/step  {m / base:.2f}x")


if __name__ == "__main__":
    main()
