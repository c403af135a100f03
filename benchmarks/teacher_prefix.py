"""How much of the teacher's answer does the SLM need? The teacher writes the first part, the SLM the rest (no torch).

For each teacher trajectory of a labels folder (the teacher's own greedy answers to train
problems, never dev: `s2t-edge label`), the first fraction f of its answer tokens is kept and the
base SLM (or, with --bundle, the adapted SLM) continues greedily from there, one continuous batch
with a token budget per rollout; the whole answer is graded as `eval` grades. f = 0 is the SLM's
own greedy answer, f = 1 the teacher's.

Where the accuracy climbs with f says where the teacher's advantage sits: a steep start means the
plan (the first tokens) decides the answer and a loss could weight early positions; a straight
line means the selections count all along the answer.

    python benchmarks/teacher_prefix.py data/labels/gsm8k-train \\
        --data ../shared/datasets/gsm8k/train.jsonl --limit 96 --fractions 0 0.1 0.25 0.5 0.75 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def prefix_len(n_answer: int, f: float) -> int:
    """Answer tokens the teacher writes at fraction f (at most all but the last: the SLM adds one)."""
    return min(int(round(f * n_answer)), n_answer - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("labels", type=Path, help="labels folder of the teacher's own trajectories")
    ap.add_argument("--data", type=Path, required=True, help="the JSONL the labels came from (gold answers)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0, 0.1, 0.25, 0.5, 0.75])
    ap.add_argument("--limit", type=int, default=96, help="the first N trajectories")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--bundle", type=Path, help="the SLM continues under this bundle's adapter")
    ap.add_argument("--out", type=Path, help="write every rollout's outcome here (JSON)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if any(not 0 <= f < 1 for f in args.fractions):
        sys.exit("error: --fractions must lie in [0, 1)")

    from s2t_edge.train.trajectories import load_trajectories

    from s2t_edge.batch import decode_batch
    from s2t_edge.bundle import load_bundle
    from s2t_edge.engine import Engine
    from s2t_edge.eval.data import load_problems
    from s2t_edge.eval.grading import extract_answer, is_correct
    from s2t_edge.policy import greedy
    from s2t_edge.store import resolve_model

    trajs = [t for t in load_trajectories(args.labels) if t.source == "teacher-greedy"][: args.limit]
    if not trajs:
        sys.exit(f"error: {args.labels} holds no teacher trajectories")
    gold = {p.id: p.gold for p in load_problems(args.data)[0]}
    missing = [t.problem_id for t in trajs if t.problem_id not in gold]
    if missing:
        sys.exit(f"error: {args.data} lacks problem {missing[0]} of {args.labels}")
    lora = load_bundle(args.bundle).adapter_path if args.bundle else None
    todo = [(i, f) for i in range(len(trajs)) for f in args.fractions]
    prompts, budgets = [], []
    for i, f in todo:
        t = trajs[i]
        n_answer = len(t.tokens) - t.first  # tokens = prompt + answer[:-1]
        L = prefix_len(n_answer, f)
        prompts.append(t.tokens[: t.first + 1 + L].tolist())
        budgets.append(max(1, args.max_tokens - L))
    print(
        f"{len(trajs)} teacher trajectories ({sum(t.correct for t in trajs)} right), {len(todo)} rollouts", flush=True
    )
    gguf = resolve_model(None)
    n_ctx_seq = max(t.first + 1 for t in trajs) + args.max_tokens + 8
    right = np.zeros(len(todo), bool)
    t0 = time.time()
    with Engine(gguf, n_ctx=n_ctx_seq * args.batch, n_threads=args.threads, n_seq=args.batch, lora=lora) as eng:
        for n, (j, ids, stats) in enumerate(decode_batch(eng, prompts, greedy(), max_tokens=budgets), 1):
            t = trajs[todo[j][0]]
            done = stats.finish_reason == "stop"
            pred = extract_answer(eng.detokenize(prompts[j][t.first + 1 :] + ids), complete=done)
            right[j] = done and is_correct(pred, gold[t.problem_id])
            print(f"\r{n:4d}/{len(todo)} rolled out ({time.time() - t0:.0f} s)", end="", flush=True)
    print()
    teacher_right = np.array([trajs[i].correct for i, _ in todo])
    frac = np.array([f for _, f in todo])
    print(f"{'teacher writes':>15}  {'all':>14}  {'teacher right':>14}  {'teacher wrong':>14}")
    rows = []
    for f in args.fractions:
        m = frac == f
        cells = [right[m & s] for s in (np.ones_like(m), teacher_right, ~teacher_right)]
        print(f"{f:>14.0%}   " + "  ".join(f"{c.sum():>4}/{len(c):<4} {c.mean() if len(c) else 0:5.1%}" for c in cells))
        rows.append({"fraction": f, "right": int(cells[0].sum()), "n": int(m.sum())})
    print(f"{'100%':>15}   teacher's own answer: {teacher_right[frac == args.fractions[0]].mean():.1%}")
    if args.out:
        outcomes = [{"key": trajs[i].key, "fraction": f, "right": bool(r)} for (i, f), r in zip(todo, right)]
        args.out.write_text(json.dumps({"by_fraction": rows, "rollouts": outcomes}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from s2t_edge.errors import S2TError

    try:
        main()
    except S2TError as e:
        sys.exit(f"error: {e}")
