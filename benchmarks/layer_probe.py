"""Does an intermediate layer of the SLM know better than its final layer where the teacher disagrees?

    python benchmarks/layer_probe.py extract GROUPS_DIR FEATS_DIR [--threads 2]
    python benchmarks/layer_probe.py probe GROUPS_DIR FEATS_DIR [--threads 1]

`extract` re-runs the SLM (transformers, the GGUF dequantized; needs `pip install accelerate`)
over every stored trajectory of GROUPS_DIR and saves the hidden states of layers 4, 8, ..., 24 at
the positions the shards label (resumable, one file per shard). `probe` trains, per feature set,
a small MLP on the training problems of the seed-0 split (the split `s2t-edge train` uses) with
two heads, divergence and the gain of taking the 2nd candidate, picks the head, epoch and firing
fraction on the validation problems, and prints the test problems' result: the teacher
probability gained per position (x1e4) by taking the 2nd candidate wherever the probe fires,
next to what an oracle would gain.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

LAYERS = (4, 8, 12, 16, 20, 24)


def trajectories(groups: Path, feats: Path) -> Iterator[tuple[object, Path, dict, dict, list[int]]]:
    """(transformers SLM, shard path, meta, arrays, prompt ids) for every shard without a features file."""
    from transformers import AutoModelForCausalLM

    from s2t_edge.collect import problem_prompt
    from s2t_edge.engine import Engine
    from s2t_edge.eval.data import load_problems
    from s2t_edge.prompt import ChatTemplate
    from s2t_edge.shards import read_manifest, read_shard, shard_paths
    from s2t_edge.store import resolve_model

    slm = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(slm.parent, gguf_file=slm.name, dtype=torch.float32).eval()
    engine = Engine(slm, n_ctx=64)  # tokenizer and chat template only
    template = ChatTemplate(engine)
    problems = {p.id: p for p in load_problems(read_manifest(groups)["data"])[0]}
    feats.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for n, path in enumerate(shard_paths(groups), 1):
        if (feats / path.name).exists():
            continue
        meta, a = read_shard(path)
        prompt = problem_prompt(engine, template, problems[meta["problem_id"]].question)
        assert len(prompt) == meta["prompt_tokens"], "the prompt differs from the one collection used"
        yield model, path, meta, a, prompt
        print(f"{n} {path.name} {len(a['chosen'])} positions {time.time() - t0:.0f}s", flush=True)


def extract(groups: Path, feats: Path) -> None:
    for model, path, _, a, prompt in trajectories(groups, feats):
        P, T = len(prompt), len(a["chosen"])
        with torch.no_grad():  # position P-1+t predicts the token of step t
            hs = model(torch.tensor([prompt + a["chosen"].tolist()[:-1]]), output_hidden_states=True).hidden_states
        np.savez(feats / path.name, **{f"l{i}": hs[i][0, P - 1 : P - 1 + T].numpy().astype(np.float16) for i in LAYERS})


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    r = np.empty(len(s))
    r[np.argsort(s)] = np.arange(len(s))
    n1 = y.sum()
    return float((r[y].sum() - n1 * (n1 - 1) / 2) / (n1 * (len(y) - n1)))


def probe_features(g, split: tuple[set[int], set[int], set[int]], feature_sets: dict[str, np.ndarray | None]) -> None:
    """Print one JSON line per feature set (each used together with the top-K logit features)."""
    torch.manual_seed(0)
    m_tr, m_va, m_te = (np.isin(g.problem, list(s)) for s in split)
    lp = g.logits - g.logits[:, :1] - np.log(np.exp(g.logits - g.logits[:, :1]).sum(1, keepdims=True))
    logit_feats = np.concatenate([lp, g.logits[:, :1] - g.logits[:, 1:2]], 1).astype(np.float32)
    div = g.diverges
    alt_gain = g.teacher_probs[:, 1] - g.teacher_probs[:, 0]  # what taking the 2nd candidate changes

    def gain_at(s: np.ndarray, m: np.ndarray, q: float) -> float:
        fire = s[m] >= np.quantile(s[m], 1 - q)
        return float(alt_gain[m][fire].sum() / m.sum() * 1e4)

    def run(name: str, X: np.ndarray, hidden: int = 256, epochs: int = 4) -> None:
        mu, sd = X[m_tr].mean(0), X[m_tr].std(0) + 1e-6
        X = torch.tensor((X - mu) / sd, dtype=torch.float32)
        net = torch.nn.Sequential(
            torch.nn.Linear(X.shape[1], hidden), torch.nn.GELU(), torch.nn.Dropout(0.3), torch.nn.Linear(hidden, 2)
        )
        opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
        y, gain, Xtr = torch.tensor(div[m_tr].astype(np.float32)), torch.tensor(alt_gain[m_tr] * 10), X[m_tr]
        best: dict | None = None
        for epoch in range(epochs):
            net.train()
            for idx in torch.randperm(len(Xtr)).split(256):
                o = net(Xtr[idx])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    o[:, 0], y[idx], pos_weight=torch.tensor(5.0)
                ) + torch.nn.functional.mse_loss(o[:, 1], gain[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                out = net(X).numpy()
            for head, head_name in enumerate(("divergence", "gain")):
                s = out[:, head]
                q = max((0.0025, 0.005, 0.01, 0.02, 0.04), key=lambda q: gain_at(s, m_va, q))
                if best is None or gain_at(s, m_va, q) > best["val_gain_x1e4"]:
                    order = np.argsort(-s[m_te])
                    best = {
                        "features": name,
                        "head": head_name,
                        "epoch": epoch + 1,
                        "fire_fraction": q,
                        "val_gain_x1e4": round(gain_at(s, m_va, q), 1),
                        "test_gain_x1e4": round(gain_at(s, m_te, q), 1),
                        "test_divergence_auc": round(_auc(div[m_te], s[m_te]), 4),
                        "test_precision_at_1pct": round(float(div[m_te][order[: int(0.01 * m_te.sum())]].mean()), 3),
                    }
        print(json.dumps(best), flush=True)

    s2t_gain = g.teacher_probs.max(1) - g.teacher_probs[:, 0]
    print(
        json.dumps(
            {
                "test_positions": int(m_te.sum()),
                "s2t_gain_x1e4": round(float(s2t_gain[m_te].mean()) * 1e4, 1),
                "oracle_2nd_candidate_gain_x1e4": round(float(np.clip(alt_gain[m_te], 0, None).mean()) * 1e4, 1),
            }
        ),
        flush=True,
    )
    for name, extra in feature_sets.items():
        run(name, logit_feats if extra is None else np.concatenate([extra.astype(np.float32), logit_feats], 1))


def probe(groups: Path, feats: Path) -> None:
    from s2t_edge.train.data import load_groups, split_problems

    g, _ = load_groups(groups, 8)
    L = load_features(groups, feats)
    sets: dict[str, np.ndarray | None] = {"logits only": None}
    sets.update({f"layer {name[1:]} + logits": L[name] for name in sorted(L, key=lambda n: int(n[1:]))})
    sets["layers 12 + 24 + logits"] = np.concatenate([L["l12"], L["l24"]], 1)
    probe_features(g, split_problems(len(g.problem_ids), 0), sets)


def load_features(groups: Path, feats: Path) -> dict[str, np.ndarray]:
    """Every per-shard features file of `feats`, concatenated in the order `load_groups` reads shards."""
    from s2t_edge.shards import shard_paths

    cols: dict[str, list[np.ndarray]] = {}
    for path in shard_paths(groups):
        with np.load(feats / path.name) as z:
            for name in z.files:
                cols.setdefault(name, []).append(z[name])
    return {name: np.concatenate(v) for name, v in cols.items()}


def main(commands: dict | None = None) -> None:
    """`extract` / `probe` (/ ...) command line, shared with lookahead_probe.py."""
    commands = commands or {"extract": extract, "probe": probe}
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=list(commands))
    ap.add_argument("groups", type=Path)
    ap.add_argument("feats", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    commands[args.command](args.groups, args.feats)


if __name__ == "__main__":
    main()
