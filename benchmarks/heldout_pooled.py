"""Policies pooled over several held-out sets: accuracy on the problems every run answered, and
exact McNemar against greedy and against a reference policy (the shipped adapter).

Each policy's answers are `<set>/<name>/results.jsonl` for every set (problem ids carry the data
file's name, so the sets do not overlap); the problems compared are those every run answered.

    python benchmarks/heldout_pooled.py greedy adapter-9 adapter-16 --against adapter-9 \\
        --sets data/results/heldout data/results/heldout-2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pooled(sets: list[Path], names: list[str]) -> dict[str, dict[str, bool]]:
    """{policy: {problem id: correct}} over every set, cut to the ids all policies answered."""
    from s2t_edge.errors import S2TError
    from s2t_edge.eval.results import RESULTS_FILE, read_records

    out: dict[str, dict[str, bool]] = {}
    for name in names:
        answers: dict[str, bool] = {}
        for s in sets:
            path = s / name / RESULTS_FILE
            if not path.is_file():
                raise S2TError(f"{path} is missing")
            for r in read_records(path):
                answers.setdefault(str(r["id"]), bool(r.get("correct")))
        out[name] = answers
    common = set.intersection(*(set(a) for a in out.values()))
    return {n: {i: a[i] for i in common} for n, a in out.items()}


def main() -> None:
    from s2t_edge.eval.compare import versus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", help="policy dirs inside each set; the first is the baseline (greedy)")
    ap.add_argument("--sets", nargs="+", type=Path, required=True)
    ap.add_argument("--against", help="also compare every policy with this one")
    args = ap.parse_args()
    runs = pooled(args.sets, args.names)
    base = args.names[0]
    n = len(runs[base])
    print(f"{n} problems in {len(args.sets)} sets")
    print(f"{'policy':<14} {'accuracy':>8}  vs {base:<18} vs {args.against or '-'}")
    for name, answers in runs.items():
        acc = sum(answers.values()) / max(n, 1)
        row = f"{name:<14} {acc:>8.1%}  "
        if name != base:
            w, lo, p = versus(answers, runs[base])
            row += f"+{w}/-{lo}, p={p:.3f}".ljust(22)
        else:
            row += " " * 22
        if args.against and name not in (base, args.against):
            w, lo, p = versus(answers, runs[args.against])
            row += f"+{w}/-{lo}, p={p:.3f}"
        print(row)


if __name__ == "__main__":
    from s2t_edge.errors import S2TError

    try:
        main()
    except S2TError as e:
        sys.exit(f"error: {e}")
