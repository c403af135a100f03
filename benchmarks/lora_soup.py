"""A LoRA soup: the mean of several bundles' adapter updates, as one checked adapter bundle.

Adapters of one shape trained on different data (adapter 9 on 408 trajectories, adapter 16 on
987) make different mistakes on held-out problems; averaging their weight updates is the cheap
ensemble that costs nothing at decode time. The mean of the updates s_i · B_i A_i is itself a
LoRA of rank Σ r_i: A stacks the A_i, B stacks the B_i scaled by w_i · s_i (s_i = alpha_i / r_i),
and alpha = rank so llama.cpp applies it at scale 1 (`--rank R` cuts each update to its best
rank-R approximation by SVD, for a file the size of one member's). It is loaded into torch +
peft and written by `export_bundle`, so the bundle's adapter passes the same llama.cpp-vs-peft
check as a trained one.

    python benchmarks/lora_soup.py data/bundles/adapter-9 data/bundles/adapter-16 --out runs/bundle-soup --threads 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from s2t_edge.export.bundle_writer import AdapterExport, export_bundle
from s2t_edge.export.lora_gguf import _KEY, HF_TO_GGUF
from s2t_edge.train.adapter import AdapterConfig, add_lora, load_slm

from s2t_edge.bundle import load_adapter_bundle
from s2t_edge.label_files import read_label
from s2t_edge.store import cached_sha256, resolve_model

LABELS = Path(__file__).resolve().parent.parent / "data/labels/gsm8k-train"


def read_adapter(path: Path) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(alpha, {gguf weight name: (A [r, in], B [out, r])}) of a GGUF LoRA file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    f = reader.fields["adapter.lora.alpha"]
    alpha = float(f.parts[f.data[0]][0])
    halves: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        name, half = t.name.rsplit(".lora_", 1)
        shape = tuple(int(n) for n in reversed(t.shape))
        halves.setdefault(name, {})[half] = np.asarray(t.data, np.float32).reshape(shape)
    return alpha, {name: (ab["a"], ab["b"]) for name, ab in halves.items()}


def soup(
    members: list[Path], weights: list[float], scales: list[float]
) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The rank and (A, B) pairs of Σ w_i · s_i · B_i A_i at scale 1, where s_i = scale_i · alpha_i / r
    (llama.cpp's factor for each tensor, r its own rank); every tensor's rank must be the same."""
    loaded = [read_adapter(m) for m in members]
    names = set(loaded[0][1])
    if any(set(p) != names for _, p in loaded):
        raise SystemExit("the adapters adapt different weights; a soup needs one shape")
    ranks = {p[name][0].shape[0] for _, p in loaded for name in names}
    if len(ranks) != 1:
        raise SystemExit(f"the adapters' tensors have ranks {sorted(ranks)}; a soup needs one rank")
    (r,) = ranks
    pairs = {}
    for name in sorted(names):
        pairs[name] = (
            np.concatenate([p[name][0] for _, p in loaded], axis=0),
            np.concatenate([w * c * a / r * p[name][1] for w, c, (a, p) in zip(weights, scales, loaded)], axis=1),
        )
    return r * len(loaded), pairs


def compress(pairs: dict[str, tuple[np.ndarray, np.ndarray]], rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each update B A cut to its best rank-`rank` approximation (truncated SVD), at scale 1."""
    out = {}
    for name, (a, b) in pairs.items():
        u, s, vt = np.linalg.svd(b.astype(np.float64) @ a.astype(np.float64), full_matrices=False)
        out[name] = (vt[:rank].astype(np.float32), (u[:, :rank] * s[:rank]).astype(np.float32))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--weights", type=float, nargs="*", help="default: equal, summing to 1")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=None, help="cut the soup to this rank by SVD (default: Σ r_i)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.weights or [1 / len(args.bundles)] * len(args.bundles)
    if len(weights) != len(args.bundles):
        raise SystemExit(f"{len(weights)} weights for {len(args.bundles)} bundles")
    gguf_path = resolve_model(None)
    bundles = [load_adapter_bundle(b, gguf_path, "to average") for b in args.bundles]
    if len({b.manifest["k"] for b in bundles}) != 1:
        raise SystemExit("the bundles show different top-K; a soup needs one K")
    targets = sorted({m for b in bundles for m in b.adapter["target_modules"]})
    rank, pairs = soup([b.adapter_path for b in bundles], weights, [b.adapter_scale for b in bundles])
    if args.rank is not None:
        if not 1 <= args.rank < rank:
            raise SystemExit(f"--rank must be between 1 and {rank - 1} (the soup's own rank is {rank})")
        rank, pairs = args.rank, compress(pairs, args.rank)

    layers = len({name.split(".")[1] for name in pairs})  # the top N layers (a member trained with --layers N)
    cfg = AdapterConfig(rank=rank, alpha=rank, targets=tuple(targets), layers=layers)
    model = add_lora(load_slm(gguf_path), cfg)
    state = {}
    for key, param in get_peft_model_state_dict(model).items():  # peft's own LoRA keys and shapes
        layer, module, half = _KEY.search(key).groups()
        name = f"blk.{int(layer)}.{HF_TO_GGUF[module]}.weight"
        if name not in pairs:
            raise SystemExit(f"peft adapts {name}, the adapters do not (not the top {layers} layers?)")
        value = torch.from_numpy(pairs[name][0 if half == "A" else 1])
        if value.shape != param.shape:
            raise SystemExit(f"{key}: the soup's {tuple(value.shape)} != peft's {tuple(param.shape)}")
        state[key] = value
    if len(state) != 2 * len(pairs):
        raise SystemExit(f"matched {len(state)} LoRA tensors of peft's, the soup has {2 * len(pairs)}")
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise SystemExit(f"peft did not take {len(result.unexpected_keys)} of the soup's tensors")
    model.eval()

    prompts = []  # the export check's token sequences: labelled train problems (their teacher answers)
    for f in sorted(LABELS.glob("train_*.npz"))[:8]:
        _, arrays = read_label(f)
        prompts.append([*arrays["prompt"].tolist(), *arrays["chosen"].tolist()])
    training = {
        "soup": [
            {"bundle": str(p), "adapter_sha256": b.adapter["sha256"], "weight": w}
            for p, b, w in zip(args.bundles, bundles, weights)
        ],
        "metrics": {},
    }
    lora = AdapterExport(
        model,
        prompts,
        k=bundles[0].manifest["k"],
        training=training,
        base_sha256=cached_sha256(gguf_path),
        check_tokens=max(map(len, prompts)),
    )
    out = export_bundle(gguf_path, None, args.out, adapter=lora, include_gguf=False)
    print(f"soup of {len(bundles)} adapters, rank {rank} → {out}")


if __name__ == "__main__":
    main()
