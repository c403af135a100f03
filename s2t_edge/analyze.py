"""`s2t-edge analyze coverage`: does local sufficiency hold for this SLM/teacher pair?

Reads collected groups and reports the divergence rate (teacher top-1 != SLM top-1) and hit@K
(the teacher's top-1 inside the SLM's top-K) at divergence points, at the highest-KL positions,
and by SLM entropy bucket.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from s2t_edge.errors import S2TError
from s2t_edge.shards import iter_shards

KS = (1, 2, 4, 8, 16, 32)


def _load(group_dir: Path) -> dict[str, np.ndarray]:
    ids, top1, kl, ent = [], [], [], []
    for _, a in iter_shards(group_dir):
        ids.append(a["slm_ids"])
        top1.append(a["teacher_top1"])
        kl.append(a["kl"])
        ent.append(a["entropy"])
    return {
        "ids": np.concatenate(ids),
        "top1": np.concatenate(top1),
        "kl": np.concatenate(kl),
        "entropy": np.concatenate(ent),
    }


def _hits(ids: np.ndarray, top1: np.ndarray) -> dict[str, float | None]:
    """hit@K for every K the groups hold (None where K exceeds the stored top-K)."""
    if len(top1) == 0:
        return {f"hit@{k}": None for k in KS}
    rank_hit = ids == top1[:, None]  # [N, Kstored]
    return {f"hit@{k}": float(rank_hit[:, :k].any(axis=1).mean()) if k <= ids.shape[1] else None for k in KS}


def coverage(group_dir: str | Path) -> dict:
    """The local-sufficiency table as a dict (also what `--json` prints)."""
    d = _load(Path(group_dir))
    n = len(d["top1"])
    div = d["ids"][:, 0] != d["top1"]
    report: dict = {"positions": n, "divergence_rate": float(div.mean()), "stored_k": int(d["ids"].shape[1])}
    rows = {"divergence": div}
    for q in (1, 5):
        cut = np.quantile(d["kl"], 1 - q / 100)
        rows[f"top{q}%_kl"] = d["kl"] >= cut
    report["rows"] = {
        name: {"n": int(mask.sum()), **_hits(d["ids"][mask], d["top1"][mask])} for name, mask in rows.items()
    }
    edges = np.quantile(d["entropy"][div], [0, 0.25, 0.5, 0.75, 1.0]) if div.any() else np.zeros(5)
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = div & (d["entropy"] >= lo) & (d["entropy"] <= hi)
        h = _hits(d["ids"][m], d["top1"][m])["hit@8"]
        buckets.append({"entropy_lo": float(lo), "entropy_hi": float(hi), "n": int(m.sum()), "hit@8": h})
    report["hit8_by_entropy"] = buckets
    # thresholds for `--trigger kl` / `--trigger entropy`, calibrated on these (training) problems
    qs = (0.5, 0.9, 0.95, 0.99)
    report["kl_quantiles"] = {str(q): float(np.quantile(d["kl"], q)) for q in qs}
    report["entropy_quantiles"] = {str(q): float(np.quantile(d["entropy"], q)) for q in qs}
    return report


def format_coverage(r: dict) -> str:
    head = f"{'positions':<14}{'n':>8}" + "".join(f"{'hit@' + str(k):>9}" for k in KS)
    lines = [
        f"{r['positions']} positions, divergence rate {r['divergence_rate']:.1%} (teacher top-1 != SLM top-1)",
        "",
        head,
    ]
    for name, row in r["rows"].items():
        cells = "".join(f"{row[f'hit@{k}']:>9.3f}" if row[f"hit@{k}"] is not None else f"{'-':>9}" for k in KS)
        lines.append(f"{name:<14}{row['n']:>8}{cells}")
    lines += ["", "hit@8 at divergence points by SLM entropy (nats, quartiles):"]
    for b in r["hit8_by_entropy"]:
        h = f"{b['hit@8']:.3f}" if b["hit@8"] is not None else "-"
        lines.append(f"  [{b['entropy_lo']:.2f}, {b['entropy_hi']:.2f}]  n={b['n']:<6} hit@8 {h}")
    lines += ["", "trigger thresholds (quantiles over all positions; --trigger kl|entropy --threshold X):"]
    for name in ("kl", "entropy"):
        qs = r[f"{name}_quantiles"]
        lines.append(f"  {name:<8}" + "  ".join(f"q{float(q) * 100:g}={v:.3f}" for q, v in qs.items()))
    return "\n".join(lines)


def plot_coverage(r: dict, path: str | Path) -> Path:
    """hit@K curves (divergence points, top-1% and top-5% KL) as a PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise S2TError("plotting needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, row in r["rows"].items():
        ks = [k for k in KS if row[f"hit@{k}"] is not None]
        ax.plot(ks, [row[f"hit@{k}"] for k in ks], marker="o", label=f"{name} (n={row['n']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(KS), [str(k) for k in KS])
    ax.set_xlabel("K (SLM top-K candidates)")
    ax.set_ylabel("teacher top-1 inside SLM top-K")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Local sufficiency: divergence rate {r['divergence_rate']:.1%}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
