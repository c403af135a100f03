"""Teacher-forced validation along a training run: what each adapter's `report.json` history holds.

Each `s2t-edge train --labels` run scores its validation problems before training and every 200
trajectories; this prints those rows side by side (agreement with the teacher's choice among the
top-K, its gain over the base SLM on the same positions, the teacher's token at divergence, and
changes where base and teacher agree), so the data curve inside one run can be read off.

    python benchmarks/adapter_history.py data/results/adapter-16/report.json data/bundles/adapter-9/train-report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    for path in paths:
        r = json.loads(Path(path).read_text())
        p = r["problems"]
        print(f"{path}: {p['train']} training trajectories, {p['val']} validation problems")
        print("  trajectories  agreement  gain over base  hit at divergence  changed where agreeing")
        for e in r["history"]:
            gain = 100 * (e["agreement"] - e["base_agreement"])
            print(
                f"  {e['trajectories_seen']:>12}  {100 * e['agreement']:8.2f}%  {gain:+13.2f}  "
                f"{100 * e['hit_at_divergence']:16.1f}%  {100 * e['changed_where_agreeing']:21.2f}%"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
