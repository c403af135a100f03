"""A GGUF LoRA adapter loaded by llama.cpp for one model, switched on or off per context."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp

from s2t_edge.backend import last_error
from s2t_edge.errors import S2TError


class LoraAdapter:
    """llama.cpp's handle on one adapter file; free it after every context that uses it."""

    def __init__(self, model: llama_cpp.llama_model_p, model_name: str, path: str | Path, scale: float = 1.0) -> None:
        p = Path(path)
        if not p.is_file():
            raise S2TError(f"{p}: no such LoRA adapter file")
        last_error[0] = ""
        handle = llama_cpp.llama_adapter_lora_init(model, str(p).encode())
        if not handle:
            why = last_error[0].split("failed to apply lora adapter: ")[-1] or "not a LoRA GGUF?"
            raise S2TError(f"{p}: llama.cpp refused this LoRA adapter for {model_name} ({why})")
        self._handle, self.path, self.scale, self.model_name = handle, p, float(scale), model_name

    def apply(self, ctx: llama_cpp.llama_context_p, on: bool) -> None:
        """Make `ctx` compute with this adapter (on) or with the base model alone (off)."""
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._handle)
        scales = (ctypes.c_float * 1)(self.scale)
        if llama_cpp.llama_set_adapters_lora(ctx, adapters if on else None, int(on), scales if on else None):
            raise S2TError(f"{self.model_name}: llama.cpp could not {'apply' if on else 'remove'} the LoRA adapter")

    def free(self) -> None:
        if self._handle:
            llama_cpp.llama_adapter_lora_free(self._handle)
            self._handle = None
