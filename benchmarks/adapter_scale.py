"""How the adapter's scale moves its selections, teacher-forced, in llama.cpp (no torch).

For each bundle and scale, llama.cpp prefills every validation trajectory of the bundle's
training run (problems it never trained on; train problems, never dev) with the adapter at that
scale, and at every position takes the best of the SLM's K candidates. Against the teacher's
choice: agreement, the teacher's token at divergence points, positions changed where base and
teacher agree, and how often the adapted top-1 over the whole vocabulary leaves the K candidates.
Scale 0 is the base model (its agreement is the labels' own: a check).

    python benchmarks/adapter_scale.py data/bundles/adapter-3 data/bundles/adapter-4 \\
        --val-of data/bundles/adapter-4 --scales 0 1 1.5 2 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def val_trajectories(bundle: Path, train_sample: int = 0):
    """The validation trajectories of the bundle's training run; with `train_sample` N, instead
    N of the trajectories it trained on (evenly spaced: does it fit them, or fail to generalise?)."""
    from s2t_edge.train.adapter import AdapterConfig
    from s2t_edge.train.trajectories import load_trajectories, run_label_dirs, split

    report = json.loads((bundle / "train-report.json").read_text())
    trajs = load_trajectories(run_label_dirs(report))
    if not train_sample:
        want = set(report["problems"]["val_ids"])
        return [t for t in trajs if t.key in want]
    keys = set(report["problems"]["keys"])
    cfg = {k: v for k, v in report["config"].items() if k in AdapterConfig.__dataclass_fields__}
    train, _ = split([t for t in trajs if t.key in keys], AdapterConfig(**{**cfg, "targets": tuple(cfg["targets"])}))
    return train[:: max(1, len(train) // train_sample)][:train_sample]


def prefill_picks(engine, t) -> tuple[np.ndarray, np.ndarray]:
    """(logits [T, vocab], the best of the SLM's K candidates [T]) at a trajectory's scored positions."""
    lg = np.stack([logits.copy() for _, logits in engine.score(t.tokens.tolist(), t.first)])
    return lg, np.take_along_axis(lg, t.ids, 1).argmax(1)


def measure(engine, trajs) -> dict:
    agree = total = hit = div_n = changed = same_n = outside = 0
    for t in trajs:
        lg, picks = prefill_picks(engine, t)
        target = t.teacher.argmax(1)
        d = target != 0
        agree += int((picks == target).sum())
        total += len(target)
        hit += int((picks[d] == target[d]).sum())
        div_n += int(d.sum())
        changed += int((picks[~d] != 0).sum())
        same_n += int((~d).sum())
        outside += int((~(lg.argmax(1)[:, None] == t.ids).any(1)).sum())
    return {
        "positions": total,
        "agreement": agree / total,
        "hit_at_divergence": hit / max(div_n, 1),
        "changed_where_agreeing": changed / max(same_n, 1),
        "top1_outside_k": outside / total,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--val-of", type=Path, help="bundle whose validation problems to use (default: each its own)")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--train-sample", type=int, default=0, help="N of the run's training trajectories instead")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from s2t_edge.bundle import load_bundle
    from s2t_edge.engine import Engine
    from s2t_edge.store import resolve_model

    common = val_trajectories(args.val_of, args.train_sample) if args.val_of else None
    for path in args.bundles:
        bundle = load_bundle(path)
        trajs = common if common is not None else val_trajectories(path, args.train_sample)
        gguf = resolve_model(None)
        n_ctx = max(len(t.tokens) for t in trajs) + 8
        with Engine(gguf, n_ctx=n_ctx, n_threads=args.threads, lora=bundle.adapter_path) as eng:
            for s in args.scales:
                t0 = time.time()
                eng.set_lora_scale(s)
                m = measure(eng, trajs)
                print(
                    f"{path.name:12s} scale {s:4.2f}  {m['positions']} positions  agreement {m['agreement']:.2%}  "
                    f"hit at divergence {m['hit_at_divergence']:.1%}  changed where agreeing "
                    f"{m['changed_where_agreeing']:.2%}  top-1 outside K {m['top1_outside_k']:.2%}  "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
