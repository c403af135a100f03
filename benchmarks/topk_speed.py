"""Top-K over a 151,936-id vocabulary: our exact subsample-bound top-k vs plain argpartition.

python benchmarks/topk_speed.py [--k 8] [--model PATH]   # real logits from the SLM when --model is given
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from s2t_edge.candidates import top_k


def argpartition_topk(x: np.ndarray, k: int) -> np.ndarray:
    idx = np.argpartition(x, -k)[-k:]
    return idx[np.argsort(-x[idx], kind="stable")]


def bench(fn, rows: list[np.ndarray], k: int, reps: int = 200) -> float:
    times = []
    for i in range(reps):
        x = rows[i % len(rows)]
        t = time.perf_counter()
        fn(x, k)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def real_logits(model: str, n: int = 64) -> list[np.ndarray]:
    from s2t_edge.engine import Engine
    from s2t_edge.store import resolve_model

    e = Engine(resolve_model(model), n_ctx=512)
    rows, logits = [], e.load(e.tokenize("Natalia sold clips to 48 of her friends in April. Let's think step by step."))
    for _ in range(n):
        rows.append(logits.copy())
        logits = e.step(int(np.argmax(logits)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--model", default=None, help="take logits from this model (default: random logits)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = (
        real_logits(args.model)
        if args.model
        else [(rng.standard_normal(151936) * 3).astype(np.float32) for _ in range(16)]
    )
    for x in rows:
        assert (top_k(x, args.k) == argpartition_topk(x, args.k)).all() or len(set(x[top_k(x, args.k)])) < args.k
    a, b = bench(argpartition_topk, rows, args.k), bench(top_k, rows, args.k)
    # alternate once more so both see the same machine state
    a2, b2 = bench(argpartition_topk, rows, args.k), bench(top_k, rows, args.k)
    print(f"k={args.k} over {rows[0].shape[0]} ids ({'real SLM logits' if args.model else 'random logits'}):")
    print(f"  argpartition + sort  {statistics.median([a, a2]):7.1f} us")
    print(
        f"  s2t_edge top_k       {statistics.median([b, b2]):7.1f} us   "
        f"speed-up {statistics.median([a, a2]) / statistics.median([b, b2]):.1f}x"
    )


if __name__ == "__main__":
    main()
