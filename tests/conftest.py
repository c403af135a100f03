"""Shared fixtures: tiny random-weight GGUF models for unit tests, real models for integration.

Integration fixtures never skip: if the real model cannot be resolved or pulled, the error
surfaces and the test fails, so CI cannot pass vacuously.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from s2t_edge.bundle import MANIFEST
from tests.tiny_gguf import write_tiny_gguf

TEACHER_KW = {"seed": 1, "n_embd": 96, "n_ff": 192, "n_layer": 3}
OTHER_VOCAB_EXTRA_TOKENS = 16


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_gguf")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_models_dir: Path) -> Path:
    """Default tiny model: seed 0, vocab size ``TINY_VOCAB_SIZE``."""
    return write_tiny_gguf(tiny_models_dir / "tiny.gguf", seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_gguf(tiny_models_dir: Path) -> Path:
    """Same vocabulary as ``tiny_gguf``, different seed and a bit bigger."""
    return write_tiny_gguf(tiny_models_dir / "tiny-teacher.gguf", **TEACHER_KW)


@pytest.fixture(scope="session")
def tiny_other_vocab_gguf(tiny_models_dir: Path) -> Path:
    """Vocabulary ``OTHER_VOCAB_EXTRA_TOKENS`` larger than ``tiny_gguf``'s."""
    return write_tiny_gguf(
        tiny_models_dir / "tiny-other-vocab.gguf",
        seed=2,
        extra_tokens=OTHER_VOCAB_EXTRA_TOKENS,
    )


@pytest.fixture(scope="session")
def slm_path() -> Path:
    """The real SLM from the model store (pulled and cached on first use)."""
    from s2t_edge.store import resolve_model

    return Path(resolve_model(None, role="slm", pull=True))


@pytest.fixture(scope="session")
def teacher_path() -> Path:
    """The real teacher model from the model store (pulled and cached on first use)."""
    from s2t_edge.store import resolve_model

    return Path(resolve_model(None, role="teacher", pull=True))


# ---- a bundle and a problem set for the runtime and eval tests (tiny SLM) ---------------------------

PROBLEMS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "A box holds 4 pens. How many pens in 3 boxes?", "answer": "4 * 3 = 12\n#### 12"},
    {"question": "Sara had 10 dollars and spent 7. How much is left?", "answer": "10 - 7 = 3\n#### 3"},
]


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    """A bundle exported from a reranker trained on synthetic groups (see test_train_export)."""
    from s2t_edge.export.bundle_writer import export_bundle

    from tests.test_train_export import train_synthetic

    tmp = tmp_path_factory.mktemp("runtime")
    _, ckpt, _ = train_synthetic(tmp, tiny_gguf)
    return export_bundle(tiny_gguf, ckpt, tmp / "bundle")


@pytest.fixture(scope="session")
def always_bundle(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Path:
    """The same bundle with threshold 0: the trigger fires at every step. The threshold lives in
    the manifest, so the ONNX file (and its sha256) is untouched and the bundle still verifies."""
    import shutil

    root = tmp_path_factory.mktemp("always") / "bundle"
    shutil.copytree(bundle_dir, root)
    m = json.loads((root / MANIFEST).read_text())
    m["threshold"] = 0.0
    m["select_rule"] = "best"
    (root / MANIFEST).write_text(json.dumps(m))
    return root


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "gsm.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


@pytest.fixture(scope="session")
def tiny_labels(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, tiny_teacher_gguf: Path, data: Path) -> Path:
    """`s2t-edge label` on the tiny models: the teacher's trajectories of the tiny problems (K = 4)."""
    from s2t_edge.label import label

    out = tmp_path_factory.mktemp("labels")
    label(tiny_gguf, tiny_teacher_gguf, data, out, k=4, max_tokens=16, batch=3, threads=1, progress=False)
    return out


def pytest_terminal_summary(terminalreporter) -> None:
    """The hostile inputs the fuzz and kill-and-resume suites tried, by class (tests/hostile.py)."""
    import sys

    hostile = sys.modules.get("tests.hostile")
    if hostile is not None and hostile.TRIED:
        tried = hostile.TRIED
        terminalreporter.write_line(
            f"hostile inputs tried: {sum(tried.values())} ("
            + ", ".join(f"{k}: {v}" for k, v in sorted(tried.items()))
            + ")"
        )
