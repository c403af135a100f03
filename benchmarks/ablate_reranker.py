"""Reranker architecture ablation: held-out metrics per variant on one groups directory.

    python benchmarks/ablate_reranker.py GROUPS_DIR [THREADS] [VARIANT ...]

Same split (seed 0), same training recipe; only the inputs / size change. Prints one JSON line
per variant (val = threshold and checkpoint selection, test = reported).
"""

import json
import sys
import tempfile
import time

import torch
from s2t_edge.train.train import TrainConfig, train

from s2t_edge.store import resolve_model

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
groups = sys.argv[1]
slm = resolve_model(None)
variants = {
    "logits only": TrainConfig(use_hidden=False, use_tokens=False),
    "+ hidden": TrainConfig(use_hidden=True, use_tokens=False),
    "+ hidden + tokens (r=32)": TrainConfig(),
    "+ hidden + tokens (r=48, width 128)": TrainConfig(rank=48, width=128),
    "+ hidden + tokens (r=32), 10 epochs": TrainConfig(epochs=10),
    "+ token prior": TrainConfig(token_prior=True),
    "+ token prior, divergence x4": TrainConfig(token_prior=True, divergent_weight=4.0),
}
chosen = sys.argv[3:] or list(variants)
for name in chosen:
    cfg = variants[name]
    t = time.time()
    r = train(groups, f"{tempfile.gettempdir()}/ablate/{name.replace(' ', '_')}", slm, cfg, progress=False)
    te, va = r["test"], r["val"]
    print(
        json.dumps(
            {
                "variant": name,
                "val_agree": round(va["agreement"], 4),
                "val_greedy": round(va["greedy_agreement"], 4),
                "test_agree": round(te["agreement"], 4),
                "test_greedy": round(te["greedy_agreement"], 4),
                "val_tp": round(va["teacher_prob"], 4),
                "val_tp_greedy": round(va["greedy_teacher_prob"], 4),
                "test_tp": round(te["teacher_prob"], 4),
                "test_tp_greedy": round(te["greedy_teacher_prob"], 4),
                "test_hit1_div": round(te["hit1_at_divergence"] or 0, 3),
                "test_false_flip": te["false_flip_rate"],
                "good": te["good_flips"],
                "bad": te["bad_flips"],
                "thr": round(r["threshold"], 3),
                "rule": r["rule"],
                "epoch": r["epoch"],
                "P": te["trigger_precision"],
                "R": te["trigger_recall"],
                "sec": round(time.time() - t),
            }
        ),
        flush=True,
    )
