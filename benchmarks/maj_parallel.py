"""maj@N cost: N samples as one llama.cpp batch sharing the prompt's KV cache vs N sequential runs,
and against one greedy decode of the same problem.

Both maj@N sides sample with T=0.7, top-p 0.8, top-k 20 on the same problems; greedy, parallel and
sequential alternate per problem.

    python benchmarks/maj_parallel.py [--n 8] [--problems 3] [--max-tokens 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from s2t_edge.collect import problem_prompt
from s2t_edge.decode import decode
from s2t_edge.engine import Engine
from s2t_edge.eval.data import load_problems
from s2t_edge.parallel import sample_parallel
from s2t_edge.policy import sampling
from s2t_edge.prompt import ChatTemplate
from s2t_edge.store import resolve_model

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "gsm8k" / "dev.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--problems", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    path = resolve_model(None)
    par = Engine(path, n_ctx=4096, n_threads=args.threads, n_seq=args.n)
    seq = Engine(path, n_ctx=4096, n_threads=args.threads)
    template = ChatTemplate(seq)
    problems, _ = load_problems(args.data, limit=args.problems)
    rows = []
    for p in problems:
        prompt = problem_prompt(seq, template, p.question)
        tg = time.perf_counter()
        greedy_tokens = sum(1 for _ in decode(seq, prompt, max_tokens=args.max_tokens))
        t0 = time.perf_counter()
        outs = sample_parallel(par, prompt, args.n, max_tokens=args.max_tokens, seed=p.index)
        t1 = time.perf_counter()
        seq_tokens = 0
        for i in range(args.n):
            policy = sampling(0.7, top_p=0.8, top_k=20, seed=p.index * 100 + i)
            seq_tokens += sum(1 for _ in decode(seq, prompt, max_tokens=args.max_tokens, **policy.decode_args()))
        t2 = time.perf_counter()
        par_tokens = sum(len(o) for o in outs)
        rows.append((t1 - t0, t2 - t1, par_tokens, seq_tokens, t0 - tg, greedy_tokens))
        print(
            f"{p.id}: greedy {t0 - tg:5.1f}s ({greedy_tokens} tok)  "
            f"parallel {t1 - t0:6.1f}s ({par_tokens} tok, {par_tokens / (t1 - t0):.1f} tok/s)  "
            f"sequential {t2 - t1:6.1f}s ({seq_tokens} tok, {seq_tokens / (t2 - t1):.1f} tok/s)"
        )
    par_rate = statistics.median(r[2] / r[0] for r in rows)
    seq_rate = statistics.median(r[3] / r[1] for r in rows)
    print(
        f"maj@{args.n} on {len(rows)} problems, max {args.max_tokens} tokens, threads {args.threads}: "
        f"median throughput parallel {par_rate:.1f} tok/s vs sequential {seq_rate:.1f} tok/s "
        f"= {par_rate / seq_rate:.2f}x"
    )
    wall = [sum(r[i] for r in rows) for i in (4, 0, 1)]
    tokens = [sum(r[i] for r in rows) for i in (5, 2, 3)]
    print(
        f"per problem vs greedy: maj@{args.n} one batch {wall[1] / wall[0]:.2f}x the wall time "
        f"({tokens[1] / tokens[0]:.2f}x the tokens), sequential {wall[2] / wall[0]:.2f}x "
        f"({tokens[2] / tokens[0]:.2f}x the tokens)"
    )


if __name__ == "__main__":
    main()
