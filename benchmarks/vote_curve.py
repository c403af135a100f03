"""What fewer or early-stopped votes would have scored, read from one maj@N eval run's answers
(no decoding): the vote over k of the N samples (mean over all k-subsets) for k = 1..N, and
early-stop rules that draw samples in rounds and stop once enough agree, with the mean number of
samples they draw. `--greedy DIR` adds rules anchored on the same model's greedy answer.

    python benchmarks/vote_curve.py data/results/heldout/adapter-9-maj8 --greedy data/results/heldout/adapter-9
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path

from s2t_edge.eval.vote import answer_key, majority_vote

Rule = Callable[[str | None, list[str | None]], tuple[str | None, int]]


def load(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (folder / "results.jsonl").open())}


def subset_curve(runs: list[dict]) -> list[float]:
    """Accuracy of the vote over k samples, averaged over every k-subset, for k = 1..N."""
    n = len(runs[0]["answers"])
    curve = []
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        hits = sum(majority_vote([r["answers"][i] for i in s])[0] == r["gold"] for r in runs for s in subsets)
        curve.append(hits / (len(runs) * len(subsets)))
    return curve


def rounds(first: int, agree: int) -> Rule:
    """Draw `first` samples; stop if `agree` of them vote the same answer, else draw the rest."""

    def rule(_greedy: str | None, answers: list[str | None]) -> tuple[str | None, int]:
        pred, votes = majority_vote(answers[:first])
        return (pred, first) if votes >= agree and pred is not None else (majority_vote(answers)[0], len(answers))

    return rule


def anchored(m: int) -> Rule:
    """Greedy first; stop if `m` samples all agree with it, else vote it with every sample."""

    def rule(greedy: str | None, answers: list[str | None]) -> tuple[str | None, int]:
        if greedy is not None and all(answer_key(a) == answer_key(greedy) for a in answers[:m]):
            return greedy, 1 + m
        return majority_vote([greedy, *answers])[0], 1 + len(answers)

    return rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a maj@N eval run folder (results.jsonl with answers)")
    ap.add_argument("--greedy", type=Path, help="the same model's greedy run on the same problems")
    args = ap.parse_args()
    runs = [r for r in load(args.run).values() if r.get("answers")]
    if not runs:
        raise SystemExit(f"error: {args.run} has no maj@N records (no 'answers')")
    n = len(runs[0]["answers"])
    print(f"{args.run}: {len(runs)} problems, {n} samples each")
    curve = ", ".join(f"k={k} {a:.1%}" for k, a in enumerate(subset_curve(runs), 1))
    print(f"vote over k samples (mean over subsets): {curve}")
    stops = ((2, 2), (3, 3), (4, 3), (4, 4))
    rules: dict[str, Rule] = {f"rounds {f}, stop at {a} agreeing": rounds(f, a) for f, a in stops if f < n}
    greedy = {}
    if args.greedy:
        greedy = {i: r["pred"] for i, r in load(args.greedy).items()}
        runs = [r for r in runs if r["id"] in greedy]
        print(f"greedy alone: {sum(greedy[r['id']] == r['gold'] for r in runs) / len(runs):.1%} on {len(runs)}")
        rules |= {f"greedy + {m} agreeing samples": anchored(m) for m in (1, 2, 3)}
    for name, rule in rules.items():
        out = [rule(greedy.get(r["id"]), r["answers"]) for r in runs]
        acc = sum(p == r["gold"] for (p, _), r in zip(out, runs)) / len(runs)
        print(f"  {name:32s} {acc:6.1%}  answers per problem {sum(c for _, c in out) / len(runs):.2f} (maj@{n}: {n})")


if __name__ == "__main__":
    main()
