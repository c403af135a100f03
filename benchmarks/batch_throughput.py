"""Offline throughput: problems decoded one at a time vs as a continuous batch (`eval --batch`).

Same prompts, same policy, same max tokens for every batch size, measured in one run; rounds
alternate the batch sizes so a noisy neighbour hits them alike. Also reports how many outputs are
token-identical to the first row (batched kernels reorder float sums, so near-ties can flip).
`--shared-prefix both` runs every batch size twice: prompts prefilled whole, and with the start
they share (the system prompt) copied from an active slot as `eval --batch` does.

    python benchmarks/batch_throughput.py [--problems 16] [--batches 1,4,8,16] [--max-tokens 256]
        [--threads 2] [--policy greedy|s2t-local] [--rounds 1] [--shared-prefix on|off|both]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

from s2t_edge import batch
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
    ap.add_argument("--shared-prefix", default="on", choices=["on", "off", "both"])
    args = ap.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.shared_prefix]
    runs = [(b, shared) for b in sizes for shared in modes]
    problems, _ = load_problems(args.data, limit=args.problems)
    bundle = None if args.policy == "s2t-local" else "none"
    ctx = args.max_tokens + 1024
    models = {b: open_models(bundle=bundle, ctx=ctx * b, threads=args.threads, n_seq=b) for b in sizes}
    first = models[sizes[0]]
    template = ChatTemplate(first.slm)
    prompts = [problem_prompt(first.slm, template, p.question) for p in problems]
    secs = {r: 0.0 for r in runs}
    prefill = {r: 0.0 for r in runs}  # seconds inside prompt prefills (the other slots wait meanwhile)
    outs: dict[tuple[int, bool], dict[int, list[int]]] = {}
    for _ in range(args.rounds):
        for b, shared in runs:
            m = models[b]
            policy = build_policy(m, args.policy)
            t0 = time.perf_counter()
            with mock.patch.object(batch, "MIN_SHARED", batch.MIN_SHARED if shared else 10**9):
                got = list(decode_batch(m.slm, prompts, policy, max_tokens=args.max_tokens))
            outs[b, shared] = {i: ids for i, ids, _ in got}
            prefill[b, shared] += sum(st.prefill_s for _, _, st in got)
            secs[b, shared] += time.perf_counter() - t0
    base = runs[0]
    tokens = {r: sum(len(v) for v in outs[r].values()) for r in runs}
    rate0 = tokens[base] * args.rounds / secs[base]
    print(
        f"{args.policy}, {len(prompts)} GSM8K dev problems, max {args.max_tokens} tokens, "
        f"{args.threads} threads, {args.rounds} round(s)"
    )
    print(
        f"{'batch':>5} {'prefix':>7} {'tokens':>7} {'seconds':>8} {'prefill s':>9} {'tok/s':>7} {'vs row 1':>8} "
        f"{'identical':>9}"
    )
    for r in runs:
        rate = tokens[r] * args.rounds / secs[r]
        same = sum(outs[r][i] == outs[base][i] for i in range(len(prompts)))
        prefix = "shared" if r[1] else "whole"
        print(
            f"{r[0]:>5} {prefix:>7} {tokens[r]:>7} {secs[r]:>8.1f} {prefill[r]:>9.1f} {rate:>7.1f} "
            f"{rate / rate0:>8.2f} {same:>5}/{len(prompts)}"
        )
    for m in models.values():
        m.close()


if __name__ == "__main__":
    main()
