"""Does more labelled data help the reranker? Held-out gain over greedy vs. training problems.

    python benchmarks/learning_curve.py GROUPS_DIR [THREADS] [N ...]

Validation and test problems are fixed (the seed-0 split of GROUPS_DIR); only the number of
training problems changes. Prints one JSON line per size: the test teacher probability of the
taken tokens and the teacher agreement, each minus greedy's, and the flips the policy makes.
"""

import json
import sys
import tempfile

import torch
from s2t_edge.train.train import TrainConfig, train

from s2t_edge.store import resolve_model

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
groups = sys.argv[1]
slm = resolve_model(None)
sizes = [int(n) for n in sys.argv[3:]] or [15, 30, 60, 130]
for n in sizes:
    r = train(groups, f"{tempfile.gettempdir()}/curve/{n}", slm, TrainConfig(train_problems=n), progress=False)
    te, va = r["test"], r["val"]
    line = {
        "train_problems": r["problems"]["train"],
        "train_positions": r["positions"]["train"],
        "val_tp_gain_x1e4": round((va["teacher_prob"] - va["greedy_teacher_prob"]) * 1e4, 1),
        "test_tp_gain_x1e4": round((te["teacher_prob"] - te["greedy_teacher_prob"]) * 1e4, 1),
        "test_agree_gain_x1e4": round((te["agreement"] - te["greedy_agreement"]) * 1e4, 1),
        "test_hit1_div": round(te["hit1_at_divergence"] or 0, 3),
        "good": te["good_flips"],
        "bad": te["bad_flips"],
        "flip_rate": round(te["flip_rate"], 4),
        "epoch": r["epoch"],
    }
    print(json.dumps(line), flush=True)
