"""Where the adapter's selections are right and wrong, by the base SLM's confidence (no torch).

llama.cpp prefills the validation trajectories (train problems, never dev) with the bundle's
adapter and takes the best of the SLM's K candidates at every position, as `adapter_scale.py`
does. Positions are bucketed by the base SLM's top-1 probability (from the labels); per bucket:
divergences, the adapter's hits there, and the positions it changes where base and teacher agree.
Then the gate "take the adapter's choice only where base p1 < tau, else the base's top-1": the
agreement it would reach for each tau. A gate needs the base model's distribution beside the
adapted one at decode time; this measures whether that (or training toward it) is worth having.

    python benchmarks/adapter_gate.py data/bundles/adapter-3 --val-of data/bundles/adapter-4 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.adapter_scale import prefill_picks, val_trajectories  # noqa: E402

EDGES = (0.0, 0.5, 0.7, 0.9, 0.99, 1.01)
TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)


def positions(engine, trajs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base p1, adapted pick among K, teacher's choice among K) over every scored position."""
    p1, picks, target = [], [], []
    for t in trajs:
        picks.append(prefill_picks(engine, t)[1])
        target.append(t.teacher.argmax(1))
        p1.append(np.exp(t.base[:, 0]))
    return np.concatenate(p1), np.concatenate(picks), np.concatenate(target)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--val-of", type=Path, help="bundle whose validation problems to use (default: its own)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from s2t_edge.bundle import load_bundle
    from s2t_edge.engine import Engine
    from s2t_edge.store import resolve_model

    trajs = val_trajectories(args.val_of or args.bundle)
    bundle = load_bundle(args.bundle)
    n_ctx = max(len(t.tokens) for t in trajs) + 8
    with Engine(resolve_model(None), n_ctx=n_ctx, n_threads=args.threads, lora=bundle.adapter_path) as eng:
        p1, picks, target = positions(eng, trajs)
    div = target != 0
    print(f"{args.bundle.name}: {len(trajs)} validation trajectories, {len(p1)} positions, {div.sum()} divergences")
    print("base p1       positions  divergences  hits         changed where agreeing")
    for lo, hi in zip(EDGES, EDGES[1:]):
        m = (p1 >= lo) & (p1 < hi)
        d, s = m & div, m & ~div
        span = f"[{lo:.2f}, {min(hi, 1):.2f}{']' if hi > 1 else ')'}"
        print(
            f"{span}  {m.sum():9d}  {d.sum():5d} ({d.sum() / div.sum():5.1%})"
            f"  {(picks[d] == target[d]).sum():4d} ({(picks[d] == target[d]).mean() if d.any() else 0:5.1%})"
            f"  {(picks[s] != 0).sum():4d} ({(picks[s] != 0).mean() if s.any() else 0:5.2%})"
        )
    print(f"base alone: agreement {(target == 0).mean():.2%}")
    for tau in TAUS:
        gated = np.where(p1 < tau, picks, 0)
        hit = (gated[div] == target[div]).mean()
        changed = (gated[~div] != 0).mean()
        print(
            f"gate p1 < {tau:.2f}: adapter at {(p1 < tau).mean():6.1%} of positions  agreement "
            f"{(gated == target).mean():.2%}  hit at divergence {hit:.1%}  changed where agreeing {changed:.2%}"
        )


if __name__ == "__main__":
    main()
