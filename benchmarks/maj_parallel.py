"""maj@N cost: N samples as one llama.cpp batch sharing the prompt's KV cache vs N sequential runs,
and against one greedy decode of the same problem; with `--bundle`, the same on the adapted SLM
(s2t-local greedy, s2t-local-maj@N) beside the base model's.

Every maj@N side samples with T=0.7, top-p 0.8, top-k 20 on the same problems (one batch: the
seeds `eval` uses; sequential: a seed per sample); the sides alternate per problem, one problem
at a time. "s2t-local" here is greedy over the adapted SLM (a bundle's reranker is not run).

    python benchmarks/maj_parallel.py [--n 8] [--problems 3] [--max-tokens 256] [--threads 2]
    python benchmarks/maj_parallel.py --n 4 --bundle data/bundles/adapter-9 --no-sequential
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from s2t_edge.collect import problem_prompt
from s2t_edge.decode import decode
from s2t_edge.engine import Engine
from s2t_edge.eval.data import load_problems
from s2t_edge.parallel import sample_parallel
from s2t_edge.policy import sampling
from s2t_edge.prompt import ChatTemplate
from s2t_edge.runtime import open_models

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "gsm8k" / "dev.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--problems", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--bundle", default="none", help="a bundle with a LoRA adapter: time the adapted SLM too")
    ap.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    par = open_models(bundle=args.bundle, ctx=4096, threads=args.threads, n_seq=args.n, progress=False).slm
    seq = open_models(bundle=args.bundle, ctx=4096, threads=args.threads, progress=False).slm
    adapted = seq.lora_path is not None
    template = ChatTemplate(seq)
    n = args.n

    def greedy(engine: Engine, prompt: list[int], _: int) -> int:
        return sum(1 for _ in decode(engine, prompt, max_tokens=args.max_tokens))

    def one_batch(engine: Engine, prompt: list[int], seed: int) -> int:
        return sum(len(o) for o in sample_parallel(engine, prompt, n, max_tokens=args.max_tokens, seed=seed))

    def sequential(engine: Engine, prompt: list[int], seed: int) -> int:
        out = 0
        for i in range(n):
            policy = sampling(0.7, top_p=0.8, top_k=20, seed=seed * 100 + i)
            out += sum(1 for _ in decode(engine, prompt, max_tokens=args.max_tokens, **policy.decode_args()))
        return out

    sides: list[tuple[str, Engine, bool, Callable[[Engine, list[int], int], int]]] = [
        ("greedy", seq, False, greedy),
        (f"maj@{n}", par, False, one_batch),
    ]
    if args.sequential:
        sides.append((f"maj@{n} sequential", seq, False, sequential))
    if adapted:
        sides += [("s2t-local", seq, True, greedy), (f"s2t-local-maj@{n}", par, True, one_batch)]
    totals = {name: [0.0, 0] for name, *_ in sides}
    problems, _ = load_problems(args.data, limit=args.problems)
    for p in problems:
        prompt = problem_prompt(seq, template, p.question)
        line = []
        for name, engine, lora, run in sides:
            if adapted:
                engine.use_lora(lora)
            t0 = time.perf_counter()
            tokens = run(engine, prompt, p.index)
            dt = time.perf_counter() - t0
            totals[name][0] += dt
            totals[name][1] += tokens
            line.append(f"{name} {dt:5.1f}s ({tokens} tok)")
        print(f"{p.id}: " + "  ".join(line), flush=True)
    g_s, g_tok = totals["greedy"]
    print(f"{len(problems)} problems, max {args.max_tokens} tokens, threads {args.threads}, one at a time:")
    for name, (s, tok) in totals.items():
        print(
            f"  {name:24s} {s / len(problems):6.1f} s/problem  {tok / s:5.1f} tok/s  "
            f"{s / g_s:5.2f}x greedy's time  {tok / g_tok:5.2f}x its tokens"
        )


if __name__ == "__main__":
    main()
