"""What one adapter training step costs, in float32 and under bfloat16 autocast, side by side.

Loads the SLM from its GGUF with the LoRA of `s2t-edge train --labels` (attention r16 by
default), takes the same labelled trajectories, and times forward + backward of the training
loss in each mode, alternating; reports the median seconds per trajectory, the ratio, and how far
the bf16 loss and LoRA gradient are from the float32 ones (so a faster step is not a different one).

    python benchmarks/train_step.py --labels data/labels/gsm8k-train [--n 4] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s2t_edge.train.adapter import AdapterConfig, add_lora, load_slm  # noqa: E402
from s2t_edge.train.objective import losses  # noqa: E402
from s2t_edge.train.trajectories import load_trajectories  # noqa: E402

from s2t_edge.store import resolve_model  # noqa: E402


def step(model, t, cfg, bf16: bool) -> tuple[float, float, torch.Tensor]:
    """(seconds, loss, flattened LoRA gradient) of one forward + backward."""
    model.zero_grad()
    t0 = time.perf_counter()
    out = losses(model, t, replace(cfg, bf16=bf16), np.random.default_rng(0))
    out["loss"].backward()
    dt = time.perf_counter() - t0
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return dt, out["loss"].item(), grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--n", type=int, default=4, help="trajectories")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = AdapterConfig(targets=("q_proj", "k_proj", "v_proj", "o_proj"), early_weight=3.0, dropout=0.0)
    trajs = [t for t in load_trajectories(args.labels) if t.correct][: args.n]
    model = add_lora(load_slm(resolve_model(None)), cfg)
    torch.manual_seed(0)
    for p in model.parameters():  # a trained-looking adapter: B != 0, so every LoRA factor has a gradient
        if p.requires_grad and p.abs().sum() == 0:
            p.data.normal_(0, 0.01)
    model.train()
    times: dict[bool, list[float]] = {False: [], True: []}
    rel_loss, cos = [], []
    step(model, trajs[0], cfg, False)  # warm-up
    for _ in range(args.rounds):
        for t in trajs:
            s32, l32, g32 = step(model, t, cfg, False)
            s16, l16, g16 = step(model, t, cfg, True)
            times[False].append(s32)
            times[True].append(s16)
            rel_loss.append(abs(l16 - l32) / abs(l32))
            cos.append(torch.nn.functional.cosine_similarity(g32, g16, dim=0).item())
    tokens = statistics.mean(len(t.tokens) for t in trajs)
    f32, b16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"{len(trajs)} trajectories (mean {tokens:.0f} tokens) x {args.rounds} rounds, {args.threads} threads")
    print(f"float32         {f32:6.2f} s / trajectory")
    print(f"bf16 autocast   {b16:6.2f} s / trajectory   {f32 / b16:.2f}x faster")
    print(
        f"bf16 vs float32: loss rel. diff median {statistics.median(rel_loss):.4f}, "
        f"LoRA gradient cosine median {statistics.median(cos):.4f} (min {min(cos):.4f})"
    )


if __name__ == "__main__":
    main()
