"""A LoRA on the top layers only: the frozen layers below run once per trajectory, not per epoch.

With the adapter on the top N of the SLM's decoder layers, the hidden states entering layer
L - N do not depend on the adapter. They are computed once (no gradient) and kept on disk in the
run's folder, so every epoch (and a resumed run) runs forward and backward through N layers
only: with N = 8 of 24, an epoch costs about a third of a full one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from s2t_edge.errors import S2TError


def decoder(model):
    """The Qwen2-style decoder (embed_tokens, layers, norm, rotary_emb) under a PeftModel."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model


def split_layer(model, top: int) -> int:
    """Index of the first adapted layer when the top `top` layers carry the LoRA."""
    n = len(decoder(model).layers)
    if not 1 <= top <= n:
        raise S2TError(f"--layers must be between 1 and the SLM's {n} decoder layers (got {top})")
    return n - top


def run_layers(model, hidden: torch.Tensor, start: int, end: int | None = None) -> torch.Tensor:
    """Decoder layers [start, end) over one sequence's hidden states [1, T, H], causal, from position 0."""
    from transformers.masking_utils import create_causal_mask

    m = decoder(model)
    if getattr(m, "has_sliding_layers", False):
        raise S2TError("--layers: sliding-window attention layers are not supported")
    pos = torch.arange(hidden.shape[1])[None]
    emb = m.rotary_emb(hidden, pos)
    mask = create_causal_mask(config=m.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=pos)
    for layer in m.layers[start:end]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=emb, position_ids=pos)
    return hidden


def native_bf16() -> bool:
    """Whether this CPU does bfloat16 matmuls natively (x86: AVX512-BF16 or AMX); without it CPU
    autocast emulates bf16 and a training step is far slower than float32. Other CPUs: assumed so."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def final_hidden(model, tokens: np.ndarray, trunk: TrunkCache | None = None, bf16: bool = False) -> torch.Tensor:
    """Final (normed) hidden states [T, H] of a token sequence, in float32: a full forward, or the
    top layers over the trunk's cached states; `bf16` runs the decoder layers under bfloat16 autocast."""
    m = decoder(model)
    below = None if trunk is None else trunk.get(model, tokens)  # float32, outside autocast: the same cache either way
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if below is None:
            h = m(input_ids=torch.from_numpy(tokens)[None]).last_hidden_state[0]
        else:
            h = m.norm(run_layers(model, below, trunk.start))[0]
    return h.float()


class TrunkCache:
    """The frozen layers' output [1, T, H] per token sequence, one float32 `.npy` each in `folder`."""

    def __init__(self, folder: Path, start: int):
        self.folder = Path(folder)
        self.start = start
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, tokens: np.ndarray) -> Path:
        digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()[:24]
        return self.folder / f"{self.start}-{digest}.npy"

    def get(self, model, tokens: np.ndarray) -> torch.Tensor:
        path = self._path(tokens)
        try:
            return torch.from_numpy(np.load(path))
        except (OSError, ValueError):
            pass  # not cached yet: compute it (written atomically, so a kill leaves no torn file)
        with torch.no_grad():
            h = decoder(model).embed_tokens(torch.from_numpy(tokens)[None])
            h = run_layers(model, h, 0, self.start)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, h.numpy())
        os.replace(tmp, path)
        return h

    def fill(self, model, sequences: list[np.ndarray], progress: bool = True) -> None:
        """Compute every missing entry up front (one pass, with its own progress bar)."""
        from s2t_edge.progress import Progress

        todo = [s for s in sequences if not self._path(s).exists()]
        bar = Progress(len(todo), "cache the frozen layers", progress and bool(todo))
        try:
            for s in todo:
                self.get(model, s)
                bar.update()
        finally:
            bar.close()
