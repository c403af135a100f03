"""Compare finished runs on the problems they all share, as rows and as a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from s2t_edge.errors import S2TError
from s2t_edge.eval.results import RESULTS_FILE, SETTINGS_FILE, read_records, summarize


def compare_runs(dirs: list[Path], only: set[str] | None = None) -> list[dict]:
    """One summary row per results dir, all recomputed on the problem ids common to every run
    (and in `only`, when given: e.g. the first 100 problems of the data file).

    Each row also has "dir", "label" (policy, plus the dir name when policies repeat),
    "settings", "n_total" (problems in that run) and "n_common" (ids shared by all runs).
    """
    if not dirs:
        raise S2TError("nothing to compare: give at least one results dir")
    runs = []
    for d in map(Path, dirs):
        sfile, rfile = d / SETTINGS_FILE, d / RESULTS_FILE
        if not sfile.is_file() or not rfile.is_file():
            raise S2TError(f"{d} is not a results dir (needs {SETTINGS_FILE} and {RESULTS_FILE})")
        try:
            settings = json.loads(sfile.read_text(encoding="utf-8"))
        except ValueError:
            raise S2TError(f"{sfile} is not valid JSON") from None
        runs.append((d, settings, read_records(rfile)))
    common = set.intersection(*({str(r.get("id")) for r in recs} for _, _, recs in runs))
    if not common:
        raise S2TError("the runs share no problem ids; were they run on the same data file?")
    if only is not None:
        common &= only
        if not common:
            raise S2TError("none of the problems asked for is in every run")
    policies = [s.get("policy") or d.name for d, s, _ in runs]
    base = _correct_by_id(runs[policies.index("greedy")][2], common) if "greedy" in policies else None
    rows = []
    for (d, settings, recs), policy in zip(runs, policies):
        row = summarize([r for r in recs if str(r.get("id")) in common], policy=policy)
        label = f"{policy} ({d.name})" if policies.count(policy) > 1 else policy
        row.update(
            dir=str(d),
            label=label,
            settings=settings,
            n_total=len({str(r.get("id")) for r in recs}),
            n_common=len(common),
        )
        if base is not None and policy != "greedy":
            wins, losses, p = versus(_correct_by_id(recs, common), base)
            row.update(wins_vs_greedy=wins, losses_vs_greedy=losses, p_vs_greedy=p)
        rows.append(row)
    return rows


def _correct_by_id(records: list[dict], ids: set[str]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for r in records:
        out.setdefault(str(r.get("id")), bool(r.get("correct")))
    return {i: out[i] for i in ids}


def versus(mine: dict[str, bool], base: dict[str, bool]) -> tuple[int, int, float]:
    """(problems `mine` gets right and `base` wrong, the reverse, exact McNemar p) over the ids of `mine`."""
    wins = sum(ok and not base[i] for i, ok in mine.items())
    losses = sum(base[i] and not ok for i, ok in mine.items())
    return wins, losses, mcnemar_exact(wins, losses)


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: how surprising `wins` vs `losses` discordant problems are
    if the two policies were equally good (a binomial test at 1/2 on the discordant pairs)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def plot_compare(rows: list[dict], path: str | Path) -> Path:
    """Accuracy vs seconds per problem, one labelled point per run with Wilson error bars,
    saved as a PNG at `path`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise S2TError("plotting needs matplotlib: pip install matplotlib") from None
    pts = [r for r in rows if r.get("accuracy") is not None and r.get("s_per_problem") is not None]
    if not pts:
        raise S2TError("nothing to plot: no run has timed, graded problems")
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    span = max(r["s_per_problem"] for r in pts) - min(r["s_per_problem"] for r in pts) or 1.0
    placed: list[tuple[float, float]] = []
    for r in pts:
        x, acc = r["s_per_problem"], 100 * r["accuracy"]
        err = [[acc - 100 * r["ci_lo"]], [100 * r["ci_hi"] - acc]]
        ax.errorbar(x, acc, yerr=err, fmt="o", capsize=4)
        # a point close to one already labelled gets its label below instead of above
        near = sum(abs(x - px) < 0.08 * span and abs(acc - pa) < 4 for px, pa in placed)
        ax.annotate(
            str(r.get("label") or r.get("policy")), (x, acc), textcoords="offset points", xytext=(6, 6 - 14 * near)
        )
        placed.append((x, acc))
    ax.set_xlabel("seconds per problem")
    ax.set_ylabel("accuracy (%, 95% Wilson CI)")
    n = pts[0].get("n_common", pts[0]["n"])
    ax.set_title(f"Accuracy vs cost ({n} common problems)")
    ax.grid(True, alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120, bbox_inches="tight")
    return out
