"""Which divergences decide the answer: swap in the teacher's token, let the SLM go on (no torch).

For each wrong own-path trajectory of a labels folder (the SLM's greedy answers, teacher-scored:
`label --trajectories slm`; train problems, never dev), at each of its first N divergence points
(the teacher's choice among the SLM's top-K is not the SLM's top-1) the teacher's token replaces
the SLM's, the base SLM continues greedily from there (one continuous batch, a token budget per rollout), and the
continuation is graded. A swap that turns the wrong answer right marks a *critical* divergence:
the positions a sequence-level signal would weight.

`--swap other` is the control: the SLM's best candidate that is neither its top-1 nor the
teacher's choice goes in instead. Answers are fragile (any early change re-rolls the rest), so
only the teacher's fix rate *above* the control's says its tokens decide answers.

With --bundle, the adapter's pick at every position of those trajectories (llama.cpp prefill of
the SLM's path, as in `adapter_scale.py`) says whether it hits the critical divergences more or
less often than the others.

    python benchmarks/critical_swaps.py data/labels/gsm8k-train-slm \\
        --data ../shared/datasets/gsm8k/train.jsonl --first 8 --bundle data/bundles/adapter-3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.adapter_scale import prefill_picks  # noqa: E402


def swap_token(t, p: int, swap: str) -> int:
    """The token put in at divergence `p`: the teacher's choice, or (control) the best other candidate."""
    pick = int(t.teacher[p].argmax())
    if swap == "other":
        pick = next(j for j in range(1, t.ids.shape[1]) if j != pick)
    return int(t.ids[p, pick])


def rollouts(trajs, first: int) -> list[tuple[int, int, int]]:
    """(trajectory index, position, which divergence) of each wrong trajectory's first `first`."""
    out = []
    for i, t in enumerate(trajs):
        if not t.correct:
            d = np.flatnonzero(t.teacher.argmax(1) != 0)[:first]
            out += [(i, int(p), r) for r, p in enumerate(d)]
    return out


def digit_like(engine, token: int) -> bool:
    s = engine.detokenize([token])
    return any(c.isdigit() or c in "+-*/=×÷" for c in s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("labels", type=Path, help="labels folder of own-path trajectories")
    ap.add_argument("--data", type=Path, required=True, help="the JSONL the labels came from (gold answers)")
    ap.add_argument("--first", type=int, default=8, help="divergences per wrong trajectory")
    ap.add_argument("--limit", type=int, help="the first N trajectories only")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--swap", choices=["teacher", "other"], default="teacher", help="other: the control")
    ap.add_argument("--bundle", type=Path, help="also: the adapter's picks at the same positions")
    ap.add_argument("--out", type=Path, help="write every rollout's outcome here (JSON)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from s2t_edge.train.trajectories import load_trajectories

    from s2t_edge.batch import decode_batch
    from s2t_edge.engine import Engine
    from s2t_edge.eval.data import load_problems
    from s2t_edge.eval.grading import extract_answer, is_correct
    from s2t_edge.policy import greedy
    from s2t_edge.store import resolve_model

    trajs = load_trajectories(args.labels)[: args.limit]
    gold = {p.id: p.gold for p in load_problems(args.data)[0]}
    todo = rollouts(trajs, args.first)
    n_wrong = sum(not t.correct for t in trajs)
    print(f"{len(trajs)} trajectories, {n_wrong} wrong; {len(todo)} swaps to roll out", flush=True)
    gguf = resolve_model(None)
    n_prefix = max(t.first + 1 for t in trajs)  # prompt length
    n_ctx_seq = n_prefix + args.max_tokens + 8
    prompts, budgets = [], []
    for i, p, _ in todo:
        t = trajs[i]  # tokens = prompt + the SLM's answer[:-1]; the answer up to p, then the swap
        prompts.append(t.tokens[: t.first + 1 + p].tolist() + [swap_token(t, p, args.swap)])
        budgets.append(max(1, args.max_tokens - p - 1))
    t0 = time.time()
    fixed = np.zeros(len(todo), bool)
    with Engine(gguf, n_ctx=n_ctx_seq * args.batch, n_threads=args.threads, n_seq=args.batch) as eng:
        digits = np.array([digit_like(eng, prompts[j][-1]) for j in range(len(todo))])
        n_done = 0
        for j, ids, stats in decode_batch(eng, prompts, greedy(), max_tokens=budgets):
            t = trajs[todo[j][0]]
            answer = prompts[j][t.first + 1 :] + ids
            done = stats.finish_reason == "stop"
            pred = extract_answer(eng.detokenize(answer), complete=done)
            fixed[j] = done and is_correct(pred, gold[t.problem_id])
            k = int(fixed.sum())
            n_done += 1
            print(f"\r{n_done:4d}/{len(todo)} rolled out, {k} fixed  ({time.time() - t0:.0f} s)", end="", flush=True)
    print()
    traj_fixed = {todo[j][0] for j in np.flatnonzero(fixed)}
    rank = np.array([r for _, _, r in todo])
    print(
        f"swaps that turn a wrong answer right: {fixed.sum()} of {len(todo)} ({fixed.mean():.1%}); "
        f"wrong trajectories with at least one: {len(traj_fixed)} of {n_wrong}"
    )
    for r in range(args.first):
        m = rank == r
        if m.any():
            print(f"  divergence #{r + 1}: {fixed[m].sum()} of {m.sum()} fix ({fixed[m].mean():.1%})")
    for name, m in (("digit/operator", digits), ("other", ~digits)):
        print(f"  swapped-in token {name}: {fixed[m].sum()} of {m.sum()} fix ({fixed[m].mean() if m.any() else 0:.1%})")
    result = {"swaps": len(todo), "fixed": int(fixed.sum()), "wrong": n_wrong, "wrong_fixable": len(traj_fixed)}
    if args.bundle:
        from s2t_edge.bundle import load_bundle

        bundle = load_bundle(args.bundle)
        n_ctx = max(len(t.tokens) for t in trajs) + 8
        with Engine(gguf, n_ctx=n_ctx, n_threads=args.threads, lora=bundle.adapter_path) as eng:
            picks = {i: prefill_picks(eng, trajs[i])[1] for i in sorted({i for i, _, _ in todo})}
        hit = np.array([picks[i][p] == trajs[i].teacher[p].argmax() for i, p, _ in todo])
        for name, m in (("critical", fixed), ("not critical", ~fixed)):
            rate = hit[m].mean() if m.any() else 0
            print(f"  {args.bundle.name} picks the teacher's token at {name}: {hit[m].sum()} of {m.sum()} ({rate:.1%})")
        result["adapter_hit_critical"] = float(hit[fixed].mean()) if fixed.any() else None
        result["adapter_hit_other"] = float(hit[~fixed].mean()) if (~fixed).any() else None
    if args.out:
        rows = [
            {"key": trajs[i].key, "position": p, "rank": int(r), "digit": bool(d), "fixed": bool(f)}
            for (i, p, r), d, f in zip(todo, digits, fixed)
        ]
        args.out.write_text(json.dumps({**result, "rollouts": rows}, indent=1))


if __name__ == "__main__":
    from s2t_edge.errors import S2TError

    try:
        main()
    except S2TError as e:
        sys.exit(f"error: {e}")
