"""How teacher-like is a policy on its own path? Label folders side by side, on their common problems.

    python benchmarks/onpolicy_agreement.py LABELS_DIR [LABELS_DIR ...]

For each folder (e.g. `label --trajectories slm`, the same with `--bundle`, and the teacher's own):
the accuracy of its trajectories' answers, and how often the trajectory's token is the teacher's
top-1 on that trajectory's own prefix (the states the policy really visits, unlike teacher-forced
validation on the teacher's path). Only problems present in every folder count.
"""

import sys

import numpy as np

from s2t_edge.label_files import read_label
from s2t_edge.shards import shard_paths

dirs = sys.argv[1:]
if not dirs:
    raise SystemExit(__doc__)
folders = [{read_label(p)[0]["problem_id"]: read_label(p) for p in shard_paths(d)} for d in dirs]
common = sorted(set.intersection(*(set(f) for f in folders)))
print(f"{len(common)} problems in all {len(dirs)} folders")
for d, f in zip(dirs, folders):
    correct = np.mean([f[i][0]["correct"] for i in common])
    chosen = np.concatenate([f[i][1]["chosen"] for i in common])
    top1 = np.concatenate([f[i][1]["teacher_top1"] for i in common])
    agree = np.mean(chosen == top1)
    print(f"{d}: accuracy {correct:.3f}; token = teacher's top-1 at {agree:.4f} of {len(chosen)} positions")
