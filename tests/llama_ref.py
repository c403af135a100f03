"""llama-cpp-python's high-level `Llama` as a reference implementation (tests and benchmarks)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_lib


@contextlib.contextmanager
def no_extra_bufts() -> Iterator[None]:
    """Make `llama_model_default_params()` return params with `use_extra_bufts = False`.

    Why: llama.cpp's extra CPU buffer types (AMX / repacked weights) segfault on some virtualised
    Xeons; our Engine turns them off, but `Llama` has no such argument and builds its params
    from `llama_model_default_params()`, so we wrap that function while a `Llama` is built.
    """
    original = llama_lib.llama_model_default_params

    def patched() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    llama_lib.llama_model_default_params = patched
    llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        llama_lib.llama_model_default_params = original
        llama_cpp.llama_model_default_params = original


def reference_llama(path: str | Path, **kwargs: Any) -> llama_cpp.Llama:
    """A quiet `llama_cpp.Llama` for `path` with the extra buffer types off."""
    kwargs.setdefault("verbose", False)
    with no_extra_bufts():
        return llama_cpp.Llama(model_path=str(path), **kwargs)
