"""The cost of one batched step by KV cache layout, at a short and a realistic context.

16 sequences hold the same prompt (`--len` tokens); each row times one `step_many` over a subset
of them. With one unified cache every token attends over all sequences' cells, which dominates
once they are long; with a cache per sequence (unified=False) llama.cpp splits a step into one
ubatch per run of consecutive sequence ids, so a subset with gaps costs several graph computations.

    python benchmarks/kv_layout.py [--threads 2] [--steps 8] [--len 100 400] [--model NAME]
"""

from __future__ import annotations

import argparse
import time

from s2t_edge.engine import Engine
from s2t_edge.store import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--len", type=int, nargs="+", default=[100, 400], help="Prompt lengths in tokens.")
    ap.add_argument("--model", default=None, help="Registry name or .gguf (default: the SLM).")
    args = ap.parse_args()
    subsets = {
        "all 16": list(range(16)),
        "first 8": list(range(8)),
        "every other (8)": list(range(0, 16, 2)),
        "15, one gap": [s for s in range(16) if s != 5],
        "one": [0],
    }
    for length, unified in ((n, u) for n in args.len for u in (False, True)):
        e = Engine(
            resolve_model(args.model), n_ctx=16 * (length + 64), n_threads=args.threads, n_seq=16, unified=unified
        )
        prompt = (e.tokenize("Hello there, this is a test prompt of some length. " * (length // 8 + 1)))[:length]
        for s in range(16):
            e.prefill_seq(prompt, s)
        pos = dict.fromkeys(range(16), len(prompt))
        for name, seqs in subsets.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                e.step_many([100] * len(seqs), seqs, [pos[s] for s in seqs])
                for s in seqs:
                    pos[s] += 1
            dt = (time.perf_counter() - t0) / args.steps
            print(
                f"len={length:4}  unified={unified!s:5}  {name:16} {dt * 1000:7.1f} ms/step  "
                f"{len(seqs) / dt:6.1f} tok/s"
            )
        e.close()


if __name__ == "__main__":
    main()
