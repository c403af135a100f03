"""Shared fixtures: tiny random-weight GGUF models for unit tests, real models for integration.

Integration fixtures never skip: if the real model cannot be resolved or pulled, the error
surfaces and the test fails, so CI cannot pass vacuously.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
