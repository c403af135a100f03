"""`s2t-edge train`: distill the teacher's selection into the tiny reranker (CPU, minutes, seeded)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from s2t_edge.progress import Progress

from .data import Groups, load_groups, output_embedding, split_problems
from .model import FEATURE_VERSION, Reranker


@dataclass
class TrainConfig:
    k: int = 8
    rank: int = 32
    width: int = 64
    use_hidden: bool = True
    use_tokens: bool = True
    token_prior: bool = False  # also feed the token code on its own (context-free preference)
    epochs: int = 6
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    kl_weight: float = 1.0
    trigger_weight: float = 1.0
    divergent_weight: float = 1.0  # weight of divergence points in the selection loss (others: 1)
    seed: int = 0
    train_problems: int | None = None  # use only this many training problems (learning curves)


def _inputs(model: Reranker, g: Groups, emb: np.ndarray | None, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Model inputs for positions `idx`: hidden, logits and the candidates' token codes."""
    codes = model.tok_proj(torch.from_numpy(emb[g.ids[idx]].astype(np.float32))) if emb is not None else None
    return torch.from_numpy(g.hidden[idx].astype(np.float32)), torch.from_numpy(g.logits[idx]), codes


@torch.no_grad()
def predict(model: Reranker, g: Groups, emb: np.ndarray | None, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N,K], trigger probability [N])."""
    model.eval()
    scores, trig = [], []
    for s in range(0, len(g), batch):
        idx = np.arange(s, min(s + batch, len(g)))
        sc, tr = model(*_inputs(model, g, emb, idx))
        scores.append(sc.numpy())
        trig.append(torch.sigmoid(tr).numpy())
    return np.concatenate(scores), np.concatenate(trig)


RULES = ("best", "alternative")  # where the trigger fires: best-scored candidate, or best non-top-1


def choose(scores: np.ndarray, rule: str) -> np.ndarray:
    """Candidate index the selector takes at a fired step, per row."""
    return scores.argmax(1) if rule == "best" else 1 + scores[:, 1:].argmax(1)


def policy_metrics(g: Groups, scores: np.ndarray, trig: np.ndarray, threshold: float, rule: str = "best") -> dict:
    """How the full selection policy (where the trigger fires, take `choose(rule)`) does."""
    best = choose(scores, rule)
    fire = trig >= threshold
    choice = np.where(fire, best, 0)
    rows = np.arange(len(g))
    chosen_ids = g.ids[rows, choice]
    div = g.diverges
    agree = ~div
    flips = choice != 0
    return {
        "positions": len(g),
        "agreement": float((chosen_ids == g.teacher_top1).mean()),
        "greedy_agreement": float(agree.mean()),
        # the teacher's probability of the token taken: weighs a strong disagreement more than a near-tie
        "teacher_prob": float(g.teacher_probs[rows, choice].mean()),
        "greedy_teacher_prob": float(g.teacher_probs[:, 0].mean()),
        "hit1_at_divergence": float((g.ids[np.arange(len(g)), best] == g.teacher_top1)[div].mean())
        if div.any()
        else None,
        "greedy_hit1_at_divergence": 0.0,
        "flip_rate": float(flips.mean()),
        "false_flip_rate": float(flips[agree].mean()) if agree.any() else None,
        "good_flips": int((flips & (chosen_ids == g.teacher_top1)).sum()),
        "bad_flips": int((flips & (chosen_ids != g.teacher_top1)).sum()),
        "trigger_rate": float(fire.mean()),
        "trigger_precision": float(div[fire].mean()) if fire.any() else None,
        "trigger_recall": float(fire[div].mean()) if div.any() else None,
        "threshold": float(threshold),
        "rule": rule,
    }


def pick_threshold(g: Groups, scores: np.ndarray, trig: np.ndarray) -> tuple[float, str]:
    """The (trigger threshold, selection rule) that gives the taken tokens the highest mean teacher
    probability on validation problems.

    Teacher probability rather than 0/1 agreement: it is what S2T optimises (the teacher's
    choice), counts a flip away from a near-tie as nearly neutral, and is far less noisy on a
    few validation problems. Thresholds run over quantiles of the trigger probability; 1.01
    (never fire) is a candidate, so a reranker that cannot beat greedy turns itself off.
    """
    cands = [1.01] + sorted(set(np.quantile(trig, np.linspace(0.5, 0.999, 60)).tolist()))
    return max(
        ((t, r) for t in cands for r in RULES),
        key=lambda tr: (policy_metrics(g, scores, trig, *tr)["teacher_prob"], tr[0]),
    )


def train(
    group_dir: str | Path,
    out_dir: str | Path,
    slm_path: str | Path,
    cfg: TrainConfig | None = None,
    progress: bool = True,
) -> dict:
    """Train, pick the checkpoint and threshold on validation problems, report on test problems."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups, manifest = load_groups(group_dir, cfg.k)
    tr_p, va_p, te_p = split_problems(len(groups.problem_ids), cfg.seed)
    if cfg.train_problems is not None:  # a subset of the training split; validation and test stay fixed
        if cfg.train_problems < 1:
            raise ValueError(f"train_problems must be at least 1, got {cfg.train_problems}")
        tr_p = set(sorted(tr_p)[: cfg.train_problems])
    tr, va, te = groups.subset(tr_p), groups.subset(va_p), groups.subset(te_p)
    emb = output_embedding(slm_path) if cfg.use_tokens else None
    model = Reranker(
        groups.hidden.shape[1], cfg.k, cfg.rank, cfg.width, cfg.use_hidden, cfg.use_tokens, cfg.token_prior
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(tr) + cfg.batch - 1) // cfg.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    target = torch.from_numpy(tr.target)
    soft = torch.from_numpy(tr.teacher_probs / tr.teacher_probs.sum(1, keepdims=True).clip(1e-9))
    diverge = torch.from_numpy(tr.diverges.astype(np.float32))
    pos_weight = torch.tensor((1 - tr.diverges.mean()) / max(tr.diverges.mean(), 1e-6))
    rng = np.random.default_rng(cfg.seed)
    best: tuple[float, dict] | None = None
    bar = Progress(cfg.epochs * steps_per_epoch, "train", progress)
    t0 = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        for idx in np.array_split(rng.permutation(len(tr)), steps_per_epoch):
            scores, trig = model(*_inputs(model, tr, emb, idx))
            logp = torch.log_softmax(scores, -1)
            w = 1 + (cfg.divergent_weight - 1) * diverge[idx]  # selection matters most where they diverge
            sel = F.cross_entropy(scores, target[idx], reduction="none") + cfg.kl_weight * (
                soft[idx] * (soft[idx].clamp_min(1e-9).log() - logp)
            ).sum(-1)
            trig_loss = F.binary_cross_entropy_with_logits(trig, diverge[idx], pos_weight=pos_weight)
            loss = (w * sel).sum() / w.sum() + cfg.trigger_weight * trig_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(note=f"epoch {epoch + 1} loss {loss.item():.3f}")
        sc, trg = predict(model, va, emb)
        thr, rule = pick_threshold(va, sc, trg)
        m = policy_metrics(va, sc, trg, thr, rule)
        if best is None or m["teacher_prob"] > best[0]:
            best = (
                m["teacher_prob"],
                {
                    "state": {k: v.clone() for k, v in model.state_dict().items()},
                    "epoch": epoch + 1,
                    "threshold": thr,
                    "rule": rule,
                    "val": m,
                },
            )
    bar.close()
    model.load_state_dict(best[1]["state"])
    sc, trg = predict(model, te, emb)
    test = policy_metrics(te, sc, trg, best[1]["threshold"], best[1]["rule"])
    report = {
        "config": asdict(cfg),
        "feature_version": FEATURE_VERSION,
        "epoch": best[1]["epoch"],
        "threshold": best[1]["threshold"],
        "rule": best[1]["rule"],
        "val": best[1]["val"],
        "test": test,
        "problems": {"train": len(tr_p), "val": len(va_p), "test": len(te_p)},
        "positions": {"train": len(tr), "val": len(va), "test": len(te)},
        "groups": {
            "dir": str(group_dir),
            "slm_sha256": manifest.get("slm_sha256"),
            "teacher": manifest.get("teacher"),
            "teacher_sha256": manifest.get("teacher_sha256"),
            "data": manifest.get("data"),
            "mode": manifest.get("mode"),
            "adapter_sha256": manifest.get("adapter_sha256"),  # groups of the SLM under this adapter
        },
        "seconds": round(time.time() - t0, 1),
    }
    probe = np.random.default_rng(cfg.seed).choice(len(te), min(64, len(te)), replace=False)
    parity_inputs = {"hidden": te.hidden[probe].astype(np.float32), "ids": te.ids[probe], "logits": te.logits[probe]}
    torch.save(
        {
            "state_dict": model.state_dict(),
            "report": report,
            "n_embd": groups.hidden.shape[1],
            "parity_inputs": parity_inputs,
        },
        out_dir / "reranker.pt",
    )
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def load_checkpoint(path: str | Path) -> tuple[Reranker, dict]:
    """(model, checkpoint dict with `report` and held-out `parity_inputs`)."""
    import pickle

    from s2t_edge.errors import S2TError

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        c = ckpt["report"]["config"]
    except (OSError, RuntimeError, KeyError, EOFError, TypeError, pickle.UnpicklingError) as e:
        raise S2TError(f"{path}: not a reranker checkpoint from `s2t-edge train` ({e})") from e
    model = Reranker(
        ckpt["n_embd"], c["k"], c["rank"], c["width"], c["use_hidden"], c["use_tokens"], c.get("token_prior", False)
    )
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt
