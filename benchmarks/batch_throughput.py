"""Offline throughput: problems decoded one at a time vs as a continuous batch (`eval --batch`).

Same prompts, same policy, same max tokens for every batch size, measured in one run; rounds
alternate the batch sizes so a noisy neighbour hits them alike. Also reports how many outputs are
token-identical to batch 1 (batched kernels reorder float sums, so near-ties can flip).

    python benchmarks/batch_throughput.py [--problems 16] [--batches 1,4,8,16] [--max-tokens 256]
        [--threads 2] [--policy greedy|s2t-local] [--rounds 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from s2t_edge.batch import decode_batch
from s2t_edge.collect import problem_prompt
from s2t_edge.eval.data import load_problems
from s2t_edge.prompt import ChatTemplate
from s2t_edge.runtime import build_policy, open_models

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "gsm8k" / "dev.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policy", default="greedy", choices=["greedy", "s2t-local"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    problems, _ = load_problems(args.data, limit=args.problems)
    bundle = None if args.policy == "s2t-local" else "none"
    ctx = args.max_tokens + 1024
    models = {b: open_models(bundle=bundle, ctx=ctx * b, threads=args.threads, n_seq=b) for b in sizes}
    first = models[sizes[0]]
    template = ChatTemplate(first.slm)
    prompts = [problem_prompt(first.slm, template, p.question) for p in problems]
    secs = {b: 0.0 for b in sizes}
    outs: dict[int, dict[int, list[int]]] = {}
    for _ in range(args.rounds):
        for b in sizes:
            m = models[b]
            policy = build_policy(m, args.policy)
            t0 = time.perf_counter()
            outs[b] = {i: ids for i, ids, _ in decode_batch(m.slm, prompts, policy, max_tokens=args.max_tokens)}
            secs[b] += time.perf_counter() - t0
    base = sizes[0]
    tokens = {b: sum(len(v) for v in outs[b].values()) for b in sizes}
    rate0 = tokens[base] * args.rounds / secs[base]
    print(
        f"{args.policy}, {len(prompts)} GSM8K dev problems, max {args.max_tokens} tokens, "
        f"{args.threads} threads, {args.rounds} round(s)"
    )
    print(f"{'batch':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'vs ' + str(base):>6} {'identical':>9}")
    for b in sizes:
        rate = tokens[b] * args.rounds / secs[b]
        same = sum(outs[b][i] == outs[base][i] for i in range(len(prompts)))
        print(f"{b:>5} {tokens[b]:>7} {secs[b]:>8.1f} {rate:>7.1f} {rate / rate0:>6.2f} {same:>5}/{len(prompts)}")
    for m in models.values():
        m.close()


if __name__ == "__main__":
    main()
