"""A request's n choices: one prefill copied to n slots vs n prefills, side by side.

`serve` runs the n choices of a request as n slots of its batch (one unified KV cache, as
here); `BatchScheduler.add(like=)` copies the first slot's cache to the others instead of
prefilling the same prompt n times. This times, on the real SLM and one GSM8K chat prompt
(eval's system prompt), the work until every choice has its first token (the n adds and the
first step), both ways, alternating.

    python benchmarks/shared_prefill.py --threads 2 [--n 4 8 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from s2t_edge.batch import BatchScheduler
from s2t_edge.engine import Engine
from s2t_edge.eval.grading import SYSTEM_PROMPT
from s2t_edge.policy import sampling
from s2t_edge.store import resolve_model

DEV = Path(__file__).resolve().parent.parent.parent / "shared/datasets/gsm8k/dev.jsonl"


def first_tokens(e: Engine, prompt: list[int], n: int, share: bool) -> float:
    """Seconds until all `n` choices have their first token."""
    sched = BatchScheduler(e, sampling(0.7, top_p=0.8, top_k=20, seed=0))
    try:
        t0 = time.perf_counter()
        first = None
        for i in range(n):
            policy = sampling(0.7, top_p=0.8, top_k=20, seed=i)
            seq = sched.add(prompt, key=i, max_tokens=4, policy=policy, like=first if share else None)
            first = seq if first is None else first
        events = sched.step()
        dt = time.perf_counter() - t0
    finally:
        sched.close()
    if len(events) != n:
        raise SystemExit(f"{len(events)} first tokens for {n} choices")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    question = json.loads(DEV.read_text().splitlines()[0])["question"]
    with Engine(resolve_model(None), n_ctx=8 * 1024, n_threads=args.threads, n_seq=max(args.n)) as e:
        text = (
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        prompt = e.tokenize(text)
        print(f"prompt: {len(prompt)} tokens; {args.threads} threads; median of {args.rounds} alternating rounds")
        for n in args.n:
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for share in (False, True):
                    times[share].append(first_tokens(e, prompt, n, share))
            a, b = statistics.median(times[False]), statistics.median(times[True])
            print(f"n={n}: {n} prefills {a:.2f} s, one prefill copied {b:.2f} s  ({a / b:.2f}x sooner)")


if __name__ == "__main__":
    main()
