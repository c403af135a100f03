"""Prefill time when a prompt's start is already cached: shared vs whole, side by side.

Two cases of `BatchScheduler.add` (as `serve` and `eval --batch` use it), each run both ways:
- a chat's next turn, whose start (the first turn and its answer) the slot that answered it
  still holds after it finished;
- a request whose long system prompt a running request's slot holds (its cells copied).

    python benchmarks/prefix_reuse.py [--threads 2] [--rules 40]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

from s2t_edge import batch
from s2t_edge.batch import BatchScheduler
from s2t_edge.policy import greedy
from s2t_edge.prompt import ChatTemplate, chat_tokens
from s2t_edge.runtime import open_models

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def timed_add(sched: BatchScheduler, prompt: list[int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    seq = sched.add(prompt, key=len(sched.active), max_tokens=1)
    return time.perf_counter() - t0, sched.active[seq].stats.cached_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rules", type=int, default=40, help="sentences in the long system prompt")
    args = ap.parse_args()
    models = open_models(bundle="none", ctx=2048 * 4, threads=args.threads, n_seq=4)
    e = models.slm
    t = ChatTemplate(e)
    turn1 = [{"role": "user", "content": QUESTION}]
    rules = " ".join(
        f"Rule {i}: answer in plain words, cite the step you used, and keep units." for i in range(args.rules)
    )
    system = {"role": "system", "content": rules}
    for shared in (True, False):
        with mock.patch.object(batch, "MIN_SHARED", batch.MIN_SHARED if shared else 10**9):
            sched = BatchScheduler(e, greedy())
            sched.add(chat_tokens(e, t, turn1), key="turn1", max_tokens=300)
            answer: list[int] = []
            while sched.active:
                answer = next((list(ev.out) for ev in sched.step() if ev.done), answer)
            turn2 = turn1 + [
                {"role": "assistant", "content": e.detokenize(answer)},
                {"role": "user", "content": "And if she sold twice as many in June?"},
            ]
            p2 = chat_tokens(e, t, turn2)
            dt, cached = timed_add(sched, p2)
            how = "shared" if shared else "whole "
            print(f"{how}  next chat turn   {len(p2):>4} prompt tokens, {cached:>4} cached: prefill {dt:6.2f} s")
            sched.close()
            a = chat_tokens(e, t, [system, {"role": "user", "content": "What is 2 + 2?"}])
            b = chat_tokens(e, t, [system, {"role": "user", "content": "Name a colour."}])
            sched.add(a, key="a", max_tokens=1)  # running while b arrives
            dt, cached = timed_add(sched, b)
            print(f"{how}  system prompt    {len(b):>4} prompt tokens, {cached:>4} cached: prefill {dt:6.2f} s")
            sched.close()
    models.close()


if __name__ == "__main__":
    main()
