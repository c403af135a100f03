"""Route 5 of issue #10, teacher-forced: does scoring each candidate as a branch (the published
S2T-LOCAL scorer) pick the teacher's token more often than the plain adapter, on the same data?

Trains LoRA + the branch score vector (`train/branch.py`) for one epoch on exactly the training
problems and split of a finished `s2t-edge train --labels` run (same config, same order), then
prints validation metrics next to that run's. Resumable (state saved every 24 trajectories).

    python benchmarks/branch_probe.py runs/adapter-attn-2 runs/branch-probe [--trigger-p 0.9] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from s2t_edge.train.adapter import (
    add_lora,
    load_slm,
    load_trajectories,
    lora_state,
    run_label_dirs,
    split,
)
from s2t_edge.train.branch import BranchConfig, branch_evaluate, branch_logits, branch_losses
from s2t_edge.train.objective import candidate_logits

from s2t_edge.store import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reference", type=Path, help="A finished adapter run: its problems, split and config.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--trigger-p", type=float, default=0.9)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.reference / "checkpoint.pt").is_file():
        raise SystemExit(f"{args.reference}: not a finished `s2t-edge train --labels` run (no checkpoint.pt)")
    ref_ck = torch.load(args.reference / "checkpoint.pt", map_location="cpu", weights_only=False)
    report = json.loads((args.reference / "report.json").read_text())
    c = ref_ck["config"]
    cfg = BranchConfig(**{**c, "targets": tuple(c["targets"])}, trigger_p=args.trigger_p, head_lr=args.head_lr)
    dirs = run_label_dirs(report)
    have = {t.key: t for t in load_trajectories(dirs)}
    keys = [p if "/" in p else f"{dirs[0].name}/{p}" for p in ref_ck["problems"]]  # older runs: bare ids
    train, val = split([have[p] for p in keys], cfg)
    print(f"{len(train)} training / {len(val)} validation trajectories, trigger p1 < {cfg.trigger_p}", flush=True)

    torch.manual_seed(cfg.seed)
    model = add_lora(load_slm(resolve_model(None)), cfg)
    w = torch.zeros(model.get_base_model().config.hidden_size, requires_grad=True)
    lora = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora}, {"params": [w], "lr": cfg.head_lr}], lr=cfg.lr, weight_decay=0.0)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "state.pt"
    state = {"done": 0, "history": [], "seconds": 0.0}
    if state_path.exists():
        from peft import set_peft_model_state_dict

        ck = torch.load(state_path, map_location="cpu", weights_only=False)
        set_peft_model_state_dict(model, ck["lora"])
        w.data.copy_(ck["w"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
    else:
        with torch.no_grad():  # the tree mask must leave the trunk as it is without branches
            t = val[0]
            _, plain = candidate_logits(model, t)
            _, trunk, _ = branch_logits(model, w, t, np.arange(len(t.ids)))
            print(f"check: trunk logits with branches vs plain, max |diff| {(trunk - plain).abs().max():.2e}")
        state["history"].append({"tag": "base", **branch_evaluate(model, w, val, cfg.trigger_p)})
        print(json.dumps(state["history"][-1]), flush=True)

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {"lora": lora_state(model), "w": w.detach().clone(), "optimizer": opt.state_dict(), "state": state}, tmp
        )
        os.replace(tmp, state_path)

    order = np.random.default_rng(cfg.seed).permutation(len(train))
    t0 = time.time() - state["seconds"]
    model.train()
    while state["done"] < len(train):
        t = train[order[state["done"]]]
        out = branch_losses(model, w, t, cfg, np.random.default_rng([cfg.seed, state["done"]]))
        (out["loss"] / cfg.accumulate).backward()
        state["done"] += 1
        if state["done"] % cfg.accumulate == 0 or state["done"] == len(train):
            opt.step()
            opt.zero_grad()
            state["seconds"] = time.time() - t0
            if state["done"] % 24 == 0:
                save()
        s = time.time() - t0
        print(
            f"{state['done']}/{len(train)} loss {out['loss'].item():.3f} {s / state['done']:.1f} s/traj",
            flush=True,
        )
    if state["history"][-1]["tag"] != "epoch1":
        state["history"].append({"tag": "epoch1", **branch_evaluate(model, w, val, cfg.trigger_p)})
        state["seconds"] = time.time() - t0
        save()
    result = {"branch": state["history"], "adapter": report["history"], "seconds": round(state["seconds"])}
    (args.out / "report.json").write_text(json.dumps(result, indent=2))
    for name, hist in (("adapter", report["history"]), ("adapter + branches", state["history"])):
        for h in hist:
            print(
                f"{name:18s} {h['tag']:7s} agreement {h['agreement']:.4f}  "
                f"hit at divergence {h['hit_at_divergence']:.3f}  "
                f"changed where agreeing {h['changed_where_agreeing']:.4f}"
                + (
                    f"  plain hit {h['plain_hit_at_divergence']:.3f}  fire {h['fire_rate']:.3f}"
                    if "fire_rate" in h
                    else ""
                )
            )


if __name__ == "__main__":
    main()
