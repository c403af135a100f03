"""Answers cut at --max-tokens, two eval runs side by side: does the cut explain the difference?

    python benchmarks/cut_answers.py RUN_A RUN_B     # e.g. data/results/dev/greedy data/results/dev/adapter-3

On the problems both runs hold: how many answers each cuts (finish_reason other than "stop"),
cut by both / by one only, and on the ones cut by only one run, how often each run was right;
plus the mean length of the answers that did finish.
"""

import sys
from pathlib import Path

from s2t_edge.eval.results import read_records

if len(sys.argv) != 3:
    raise SystemExit(__doc__)
a, b = ({str(r["id"]): r for r in read_records(Path(d) / "results.jsonl")} for d in sys.argv[1:])
common = sorted(set(a) & set(b))


def cut(r: dict) -> bool:
    return r.get("finish_reason") != "stop"


name_a, name_b = (Path(d).name for d in sys.argv[1:])
print(f"{len(common)} problems in both runs")
for name, run in ((name_a, a), (name_b, b)):
    done = [run[i]["tokens"] for i in common if not cut(run[i])]
    print(f"{name}: {sum(cut(run[i]) for i in common)} cut; the finished answers {sum(done) / len(done):.0f} tokens")
print(f"cut by both: {sum(cut(a[i]) and cut(b[i]) for i in common)}")
for name, first, other in ((name_a, a, b), (name_b, b, a)):
    only = [i for i in common if cut(first[i]) and not cut(other[i])]
    right_other = sum(bool(other[i]["correct"]) for i in only)
    right_first = sum(bool(first[i]["correct"]) for i in only)
    print(f"cut by {name} only: {len(only)}; right there: {name} {right_first}, the other run {right_other}")
