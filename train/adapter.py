"""`s2t-edge train --adapter`: distill the teacher's selections into a LoRA adapter on the SLM itself.

The SLM is loaded from the very GGUF the runtime runs (transformers dequantizes it: the weights
llama.cpp computes with). At every position of a labelled trajectory the adapted model scores
only the SLM's K candidates (K rows of the output embedding, not the 151,936-row head) and is
trained listwise toward the teacher's distribution over them (or, the "vocab" objective, toward
the teacher's choice over the whole vocabulary), divergence points weighted; a KL
to the frozen SLM over (the K candidates + everything else), taken at sampled positions, keeps
its general behaviour. Checkpoints are small and atomic; a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from s2t_edge.train.objective import evaluate, losses
from s2t_edge.train.trajectories import (  # noqa: F401  (split, run_label_dirs: part of this module's API)
    Trajectory,
    check_labels,
    label_dirs,
    load_trajectories,
    run_label_dirs,
    split,
)
from s2t_edge.train.trunk import TrunkCache, decoder, split_layer

from s2t_edge.errors import S2TError
from s2t_edge.label_files import read_label
from s2t_edge.progress import Progress

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    lr: float = 1e-4
    accumulate: int = 4  # trajectories per optimizer step
    epochs: int = 1
    divergent_weight: float = 3.0
    # a divergence weighs `divergent_weight` only where the teacher prefers its choice over the SLM's
    # top-1 by at least this many nats of log-prob (0: every divergence); near-ties weigh like agreement
    divergent_margin: float = 0.0
    kl_weight: float = 0.1  # KL(frozen SLM || adapted) over K candidates + the rest
    kl_positions: int = 32  # positions per trajectory where the full-vocabulary term is taken
    only_correct: bool = True  # train on the teacher's trajectories whose answer is right (others: all)
    val_fraction: float = 0.05
    split: str = "hash"  # a problem is in validation by a hash of (seed, id): stable as labels grow
    seed: int = 0
    max_problems: int | None = None
    checkpoint_every: int = 50  # trajectories
    targets: tuple[str, ...] = field(default=TARGETS)
    layers: int | None = None  # LoRA on the top N decoder layers only (the frozen ones below are cached)
    # "select": listwise toward the teacher over the K candidates (renormalised); "vocab": cross-entropy
    # toward the teacher's choice over the whole vocabulary (plain distillation: no top-K restriction)
    objective: str = "select"
    # "select": weight of the listwise KL to the teacher over the K candidates beside the cross-entropy
    # toward its choice (1: ours so far; the published S2T-LOCAL loss uses 0.1)
    teacher_kl_weight: float = 1.0
    early_weight: float = 1.0  # positions in the first `early_fraction` of each answer weigh this much more
    early_fraction: float = 0.25
    # what each position is trained toward: "teacher" (its selection among the K candidates),
    # "chosen" (the token the trajectory took: with right samples only, rejection sampling), or
    # "samples" (the chosen tokens on sampled answers, the teacher's selection on every other trajectory)
    toward: str = "teacher"
    bf16: bool = False  # the decoder's forward and backward under bfloat16 autocast (LoRA, optimizer, losses: float32)


def load_slm(gguf: Path, dtype: torch.dtype = torch.float32):
    """The SLM from its GGUF, dequantized by transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)


def add_lora(model, cfg: AdapterConfig):
    from peft import LoraConfig, get_peft_model

    top = None if cfg.layers is None else list(range(split_layer(model, cfg.layers), len(decoder(model).layers)))
    lc = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        bias="none",
        layers_to_transform=top,
    )
    return get_peft_model(model, lc)


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lora_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def train_adapter(
    labels: Path | Sequence[Path],
    gguf: Path,
    out_dir: Path,
    cfg: AdapterConfig | None = None,
    *,
    threads: int | None = None,
    progress: bool = True,
    validate_every: int = 200,
    keys: Sequence[str] | None = None,
) -> dict:
    """Train (or resume) a LoRA adapter on one labels folder or several; writes
    `out_dir/adapter.pt` (best on validation) and `report.json`. Returns the report.

    A run keeps the problems it started with: labelling may go on in the same folder, and a
    resumed run still trains on exactly the first run's split (new problems wait for a new run).
    `keys` (a report's `problems.keys`) restricts a new run to the trajectories another run had in
    the folders it trained on (a bundle is rebuilt from folders that have grown since); a folder
    the keys never name is taken whole (that run's data plus a new folder)."""
    from s2t_edge.locks import lock_folder

    cfg = cfg or AdapterConfig()
    if threads:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_folder(out_dir):
        return _train(label_dirs(labels), gguf, out_dir, cfg, progress, validate_every, keys)


def _config_dict(cfg: AdapterConfig) -> dict:
    """The config as a checkpoint and a report record it (JSON-friendly)."""
    return {**asdict(cfg), "targets": list(cfg.targets)}


def _only(trajs: list[Trajectory], keys: Sequence[str], where: str) -> list[Trajectory]:
    """The trajectories named by `keys`, in that order; refused when a folder lacks one."""
    have = {t.key: t for t in trajs}
    missing = [k for k in keys if k not in have]
    if missing:
        raise S2TError(f"{where} lacks {len(missing)} labelled problems this run trains on (e.g. {missing[0]})")
    return [have[k] for k in keys]


def _train(
    dirs: list[Path],
    gguf: Path,
    out_dir: Path,
    cfg: AdapterConfig,
    progress: bool,
    validate_every: int,
    keys: Sequence[str] | None,
) -> dict:
    from peft import set_peft_model_state_dict

    label_settings = check_labels(dirs, gguf)
    where = ", ".join(map(str, dirs))
    cfg_dict = _config_dict(cfg)
    ckpt_path = out_dir / "checkpoint.pt"
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() else None
    if ck is not None:  # a checkpoint from before a config field existed ran at that field's default
        ck["config"] = {**_config_dict(AdapterConfig()), **ck["config"]}
    if ck is not None and (ck["config"] != cfg_dict or ck["gguf"] != gguf.name or ck["labels"] != label_settings):
        raise S2TError(f"{out_dir} holds a run with other settings or labels; use another --out")
    trajs = load_trajectories(dirs)
    if ck is not None:  # the trajectories the run started with, and no others
        trajs = _only(trajs, ck["problems"], where)
    elif keys is not None:
        named = {k.split("/", 1)[0] for k in keys}
        trajs = _only(trajs, keys, where) + [t for t in trajs if t.key.split("/", 1)[0] not in named]
    train, val = split(trajs, cfg)
    if not train:
        raise S2TError(f"{where}: no training trajectories (only_correct={cfg.only_correct})")
    torch.manual_seed(cfg.seed)
    model = add_lora(load_slm(gguf), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    state = {"done": 0, "history": [], "best": None, "seconds": 0.0}
    trunk = None
    if cfg.layers is not None:  # the frozen layers' output, once per trajectory, kept per SLM in the run's folder
        from s2t_edge.store import cached_sha256

        trunk = TrunkCache(out_dir / "trunk" / cached_sha256(gguf)[:16], split_layer(model, cfg.layers))
        trunk.fill(model, [t.tokens for t in train + val], progress)
    if ck is not None:
        set_peft_model_state_dict(model, ck["lora"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        state = ck["state"]
    total = cfg.epochs * len(train)
    orders = [np.random.default_rng(cfg.seed + e).permutation(len(train)) for e in range(cfg.epochs)]
    bar = Progress(total, "train", progress)
    bar.done = state["done"]
    last_ckpt = last_val = state["done"]
    running: float | None = None
    model.train()
    t_start = time.time() - state["seconds"]

    def checkpoint() -> None:
        nonlocal last_ckpt
        state["seconds"] = time.time() - t_start
        _save_atomic(
            {
                "config": cfg_dict,
                "gguf": gguf.name,
                "labels": label_settings,
                "problems": [t.key for t in trajs],
                "lora": lora_state(model),
                "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "state": state,
            },
            ckpt_path,
        )
        last_ckpt = state["done"]

    def validate(tag: str) -> None:
        nonlocal last_val
        last_val = state["done"]
        m = evaluate(model, val, trunk)
        m["trajectories_seen"] = state["done"]
        state["history"].append({"tag": tag, **m})
        if state["best"] is None or m["agreement"] > state["best"]["agreement"]:
            state["best"] = {"tag": tag, **m}
            _save_atomic({"config": cfg_dict, "lora": lora_state(model), "val": m}, out_dir / "adapter.pt")
        checkpoint()  # the run's state and adapter.pt always describe the same weights

    if state["done"] == 0 and not state["history"]:
        validate("base")
    try:
        while state["done"] < total:
            epoch, i = divmod(state["done"], len(train))
            t = train[orders[epoch][i]]
            rng = np.random.default_rng([cfg.seed, state["done"]])
            out = losses(model, t, cfg, rng, trunk)
            (out["loss"] / cfg.accumulate).backward()
            stepped = (state["done"] + 1) % cfg.accumulate == 0 or state["done"] + 1 == total
            if stepped:
                opt.step()
                opt.zero_grad()
            state["done"] += 1
            loss = out["loss"].item()
            running = loss if running is None else 0.95 * running + 0.05 * loss
            bar.update(note=f"epoch {epoch + 1} loss {running:.3f} (kl {out['kl'].item():.4f})")
            if not stepped:
                continue  # checkpoints and validation only between optimizer steps
            if state["done"] % len(train) == 0:
                validate(f"epoch{state['done'] // len(train)}")
            elif state["done"] - last_val >= validate_every:
                validate(f"t{state['done']}")
            elif state["done"] - last_ckpt >= cfg.checkpoint_every:
                checkpoint()
    finally:
        bar.close()
        if state["done"] > last_ckpt and state["done"] % cfg.accumulate == 0:
            checkpoint()  # Ctrl-C between optimizer steps loses nothing
    report = {
        "config": cfg_dict,
        "gguf": gguf.name,
        "k": int(trajs[0].ids.shape[1]),
        "labels": [str(d) for d in dirs],
        "label_settings": label_settings,
        "problems": {
            "train": len(train),
            "val": len(val),
            "val_ids": [t.key for t in val],
            "keys": [t.key for t in trajs],  # every trajectory the run had: `train --problems-of`
        },
        "best": state["best"],
        "history": state["history"],
        "seconds": round(state["seconds"], 1),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def load_adapter(run_dir: Path, gguf: Path, which: str = "best"):
    """(PeftModel with the `which` adapter of a `train_adapter` run, its report): "best" on
    validation (adapter.pt) or the "last" weights trained (checkpoint.pt)."""
    from peft import set_peft_model_state_dict

    path = Path(run_dir) / ("adapter.pt" if which == "best" else "checkpoint.pt")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        report = json.loads((Path(run_dir) / "report.json").read_text())
        if which == "last":
            report["best"] = ck["state"]["history"][-1]  # what the bundle records as its metrics
        c = ck["config"]
        cfg = AdapterConfig(**{**c, "targets": tuple(c["targets"])})
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as e:
        raise S2TError(f"{run_dir}: not a finished `s2t-edge train --labels` run ({e})") from e
    model = add_lora(load_slm(gguf), cfg)
    set_peft_model_state_dict(model, ck["lora"])
    model.eval()
    return model, report


def adapter_export(run_dir: Path, gguf: Path, *, which: str = "best", threads: int | None = None, n_prompts: int = 8):
    """What `export_bundle` needs for a trained adapter: the model, held-out token sequences for
    the export check (validation problems' prompts with the teacher's answers — the positions the
    adapter was trained on, never dev) and the training record."""
    from s2t_edge.export.bundle_writer import AdapterExport

    from s2t_edge.shards import read_manifest, shard_name
    from s2t_edge.store import cached_sha256

    if threads:
        torch.set_num_threads(threads)
    model, report = load_adapter(run_dir, gguf, which)
    dirs = {d.name: d for d in run_label_dirs(report)}
    prompts = []
    for key in report["problems"]["val_ids"][:n_prompts]:
        folder, pid = key.rsplit("/", 1) if "/" in key else (next(iter(dirs)), key)
        _, a = read_label(dirs[folder] / shard_name(pid))
        prompts.append([*a["prompt"].tolist(), *a["chosen"].tolist()])
    training = {
        "labels": [{"dir": name, **(read_manifest(d) or {})} for name, d in dirs.items()],
        "config": report["config"],
        "problems": {k: v for k, v in report["problems"].items() if k != "val_ids"},
        "metrics": report["best"],
        "seconds": report["seconds"],
    }
    k = int(report.get("k", 8))
    return AdapterExport(
        model, prompts, k=k, training=training, base_sha256=cached_sha256(gguf), check_tokens=max(map(len, prompts))
    )
