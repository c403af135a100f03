"""The adapter's training data: labelled trajectories from one or more labels folders, and the
seeded train / validation split by problem."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from s2t_edge.errors import S2TError
from s2t_edge.label_files import label_problem, read_label
from s2t_edge.shards import shard_paths

if TYPE_CHECKING:
    from s2t_edge.train.adapter import AdapterConfig


@dataclass
class Trajectory:
    key: str  # "<labels folder>/<problem id>": one problem may be labelled in several folders
    problem_id: str
    tokens: np.ndarray  # prompt + chosen[:-1]
    first: int  # index of the first scored position (len(prompt) - 1)
    ids: np.ndarray  # [T, K]
    teacher: np.ndarray  # [T, K] teacher log-probs
    base: np.ndarray  # [T, K] frozen SLM full-vocabulary log-probs
    correct: bool
    source: str = "teacher-greedy"  # whose: teacher-greedy, slm-greedy / -sample, adapter-greedy / -sample:<sha256>
    chosen: np.ndarray | None = None  # [T] the token the trajectory took at each position

    @property
    def filtered(self) -> bool:
        """Kept only when right under `only_correct`: demonstrations (the teacher's answers) and
        samples (rejection sampling), not the student's greedy path the teacher corrects."""
        return self.source == "teacher-greedy" or "-sample" in self.source


def label_dirs(labels: Path | Sequence[Path]) -> list[Path]:
    """One labels folder or several (their names must differ: they prefix the trajectory keys)."""
    dirs = [Path(labels)] if isinstance(labels, (str, Path)) else [Path(d) for d in labels]
    names = [d.name for d in dirs]
    if not dirs or len(set(names)) != len(names):
        raise S2TError(f"give one or more labels folders with distinct names (got {', '.join(names) or 'none'})")
    return dirs


def load_trajectories(labels: Path | Sequence[Path], k: int | None = None) -> list[Trajectory]:
    """Every scored label file of the labels folder(s), folder by folder in problem-id order
    (a wrong answer `label --score right` recorded unscored is no training data)."""
    out = []
    for label_dir in label_dirs(labels):
        paths = shard_paths(label_dir)
        if not paths:
            raise S2TError(f"{label_dir}: no label files; run `s2t-edge label` first")
        out += [t for t in (_trajectory(label_dir, p, k) for p in paths) if t is not None]
    return out


def _trajectory(label_dir: Path, path: Path, k: int | None) -> Trajectory | None:
    meta, a = read_label(path)
    if not meta.get("scored", True):
        return None
    kk = k or a["slm_ids"].shape[1]
    return Trajectory(
        f"{label_dir.name}/{meta['problem_id']}",  # a sample's id is its problem's plus ".s<j>"
        label_problem(meta),
        np.concatenate([a["prompt"], a["chosen"][:-1]]).astype(np.int64),
        len(a["prompt"]) - 1,
        a["slm_ids"][:, :kk].astype(np.int64),
        a["teacher_logprobs"][:, :kk].astype(np.float32),
        a["slm_logprobs"][:, :kk].astype(np.float32),
        bool(meta["correct"]) and meta["finish_reason"] == "stop",  # a cut answer is never "right"
        meta.get("trajectories", "teacher-greedy"),  # older label files: the teacher's
        a["chosen"].astype(np.int64),
    )


def _unit_hash(seed: int, problem_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(trajs: list[Trajectory], cfg: AdapterConfig) -> tuple[list[Trajectory], list[Trajectory]]:
    """Seeded train / validation split by problem (validation keeps every trajectory). A problem
    is in validation when a hash of (seed, its id) falls below `val_fraction`, so it stays there
    however many problems are labelled: runs on more labels are measured on a superset of the
    same validation problems, and a problem labelled in several folders is on one side only.

    `only_correct` filters the teacher's trajectories and the student's samples by their answer;
    the student's own greedy trajectories are kept whatever their answer (the teacher corrects them),
    except when trained toward their own tokens (`toward="chosen"`)."""
    if cfg.split != "hash":
        raise S2TError(f"unknown adapter split {cfg.split!r}")
    u = {t.problem_id: _unit_hash(cfg.seed, t.problem_id) for t in trajs}
    in_val = {pid: x < cfg.val_fraction for pid, x in u.items()}
    if not any(in_val.values()):  # a handful of problems: still one to validate on
        in_val[min(u, key=u.__getitem__)] = True
    val = [t for t in trajs if in_val[t.problem_id]]
    # toward the chosen tokens every trajectory is a demonstration: a wrong answer is never imitated
    keep = [t.correct or not cfg.only_correct or not (t.filtered or cfg.toward == "chosen") for t in trajs]
    train = [t for t, ok in zip(trajs, keep) if not in_val[t.problem_id] and ok]
    if cfg.max_problems is not None:
        train = train[: cfg.max_problems]
    return train, val


def check_labels(dirs: list[Path], gguf: Path) -> list[dict]:
    """Each labels folder's manifest settings; refused when one was made with another SLM."""
    from s2t_edge.shards import read_manifest
    from s2t_edge.store import cached_sha256

    out = []
    for label_dir in dirs:
        settings = (read_manifest(label_dir) or {}).get("settings", {})
        if settings.get("slm_sha256") not in (None, cached_sha256(gguf)):
            raise S2TError(
                f"{label_dir} was labelled with another SLM (sha256 {settings['slm_sha256'][:12]}…), not {gguf.name}"
            )
        out.append(settings)
    return out


def run_label_dirs(report: dict) -> list[Path]:
    """The labels folders a finished run trained on (older reports name one)."""
    labels = report["labels"]
    return [Path(labels)] if isinstance(labels, str) else [Path(d) for d in labels]
