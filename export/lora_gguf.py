"""Write a peft LoRA as a GGUF LoRA adapter that llama.cpp loads (`llama_adapter_lora_init`).

Conventions are those of llama.cpp's `convert_lora_to_gguf.py` and `src/llama-adapter.cpp`:
`general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, the base model's
`general.architecture`, and per adapted weight a pair `blk.{i}.{name}.weight.lora_a` / `.lora_b`.
In numpy (row-major, reversed ggml) shapes they are exactly peft's: lora_a = `lora_A.weight`
[r, n_in], lora_b = `lora_B.weight` [n_out, r]; llama.cpp adds `scale * alpha / r * B (A x)`.

Qwen2's q/k weights are not permuted by either llama.cpp's converter or transformers' GGUF loader
(only llama/mistral are), so HF and GGUF coordinates agree and no row permutation is applied; the
architectures this module accepts are the ones where that holds.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s2t_edge.errors import S2TError

ADAPTER_TYPE = "lora"
SUPPORTED_ARCHS = ("qwen2",)  # HF and GGUF q/k layouts agree (no rotary permutation)
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# ...layers.{i}.{self_attn|mlp}.{x}_proj.lora_{A|B}[.{adapter name}].weight
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.((?:self_attn|mlp)\.\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass
class LoraWeights:
    """A LoRA in GGUF terms: `pairs[gguf weight name] = (A [r, n_in], B [n_out, r])`, float32.

    `alpha` is written as `adapter.lora.alpha`; any per-module scaling peft applies beyond
    `alpha / r` (rsLoRA, alpha/rank patterns) is already folded into B."""

    rank: int
    alpha: float
    target_modules: list[str]
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(a.size + b.size for a, b in self.pairs.values())


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def lora_from_peft(
    model: Any = None,
    *,
    state_dict: Mapping[str, Any] | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    config: Any = None,
) -> LoraWeights:
    """The LoRA of a `PeftModel` (its active adapter), or of a peft state dict with its
    `config` (a `LoraConfig` or dict) or plain `rank` / `alpha`."""
    if model is not None:
        from peft import get_peft_model_state_dict

        name = getattr(model, "active_adapter", "default")
        name = name[0] if isinstance(name, list | tuple) else name
        config = model.peft_config[name]
        state_dict = get_peft_model_state_dict(model, adapter_name=name)
    if state_dict is None:
        raise S2TError("lora_from_peft needs a PeftModel or a state dict")
    r = int(rank if rank is not None else _cfg(config, "r", 0))
    a = float(alpha if alpha is not None else _cfg(config, "lora_alpha", 0.0))
    if r < 1 or not math.isfinite(a) or a <= 0:
        raise S2TError(f"LoRA needs rank >= 1 and a finite alpha > 0 (got rank {r}, alpha {a})")
    if _cfg(config, "use_dora", False):
        raise S2TError("DoRA adapters cannot be written as a llama.cpp LoRA; train with use_dora=False")
    if _cfg(config, "bias", "none") not in ("none", None):
        raise S2TError("LoRA bias training cannot be written as a llama.cpp LoRA; train with bias='none'")
    rs = bool(_cfg(config, "use_rslora", False))
    rank_pat, alpha_pat = _cfg(config, "rank_pattern", None) or {}, _cfg(config, "alpha_pattern", None) or {}

    halves: dict[str, dict[str, tuple[np.ndarray, str]]] = {}
    for key, value in state_dict.items():
        m = _KEY.search(key)
        if m is None:
            raise S2TError(f"cannot export LoRA tensor {key!r}: only {', '.join(HF_TO_GGUF)} are supported")
        layer, module, half = m.groups()
        if module not in HF_TO_GGUF:
            raise S2TError(f"cannot export LoRA tensor {key!r}: no llama.cpp tensor for {module}")
        arr = value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value, np.float32)
        gname = f"blk.{int(layer)}.{HF_TO_GGUF[module]}.weight"
        halves.setdefault(gname, {})[half] = (arr.astype(np.float32), f"model.layers.{layer}.{module}")
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    targets: set[str] = set()
    for gname, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise S2TError(f"LoRA for {gname} is missing its lora_{'B' if 'A' in ab else 'A'} half")
        (A, hf), (B, _) = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise S2TError(f"LoRA for {hf}: A {A.shape} and B {B.shape} are not [r, in] and [out, r]")
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise S2TError(f"LoRA for {hf} holds NaN or infinite values")
        r_m = _pattern(rank_pat, hf, r)
        a_m = float(_pattern(alpha_pat, hf, a))
        if A.shape[0] != r_m:
            raise S2TError(f"LoRA for {hf} has rank {A.shape[0]}, the config says {r_m}")
        want = a_m / (math.sqrt(r_m) if rs else r_m)  # peft's scaling of this module
        have = a / r_m  # what llama.cpp applies with adapter.lora.alpha = a
        pairs[gname] = (np.ascontiguousarray(A), np.ascontiguousarray(B * np.float32(want / have)))
        targets.add(hf.rsplit(".", 1)[1])
    if not pairs:
        raise S2TError("the LoRA holds no tensors")
    return LoraWeights(r, a, sorted(targets), pairs)


def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key the module name ends with."""
    for key, value in patterns.items():
        if re.search(rf"(^|\.){key}$", module):
            return value
    return default


def base_tensor_shapes(base_gguf: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(architecture, numpy shape of every tensor) of a GGUF model, read with the gguf package."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(base_gguf))
    except Exception as e:  # the reader raises ValueError / struct errors on damaged files
        raise S2TError(f"{base_gguf}: cannot read this GGUF ({e})") from e
    field_ = reader.fields.get("general.architecture")
    arch = bytes(field_.parts[field_.data[0]]).decode() if field_ else ""
    return arch, {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}


def check_against_base(lora: LoraWeights, base_gguf: Path) -> str:
    """Refuse a LoRA whose tensors the base GGUF lacks or has in other shapes; returns the arch."""
    arch, shapes = base_tensor_shapes(base_gguf)
    if arch not in SUPPORTED_ARCHS:
        raise S2TError(f"{base_gguf.name}: architecture {arch!r}; LoRA export supports {', '.join(SUPPORTED_ARCHS)}")
    for gname, (A, B) in lora.pairs.items():
        if gname not in shapes:
            raise S2TError(f"LoRA tensor {gname} does not exist in {base_gguf.name} (another base model?)")
        out_in = shapes[gname]
        if (B.shape[0], A.shape[1]) != out_in:
            raise S2TError(
                f"LoRA for {gname} maps {A.shape[1]} → {B.shape[0]}, {base_gguf.name} has {out_in[1]} → {out_in[0]}"
            )
    return arch


def write_lora_gguf(
    lora: LoraWeights,
    base_gguf: str | Path,
    out: str | Path,
    *,
    dtype: str = "f16",
    name: str | None = None,
    base_sha256: str | None = None,
) -> Path:
    """Write `lora` for the model `base_gguf` as a GGUF adapter at `out` (atomically); `dtype`
    "f32" or "f16" for the A/B tensors. Refuses tensors the base does not have in that shape."""
    import gguf

    if dtype not in ("f32", "f16"):
        raise S2TError(f"adapter dtype must be f32 or f16, not {dtype!r}")
    base, out = Path(base_gguf), Path(out)
    arch = check_against_base(lora, base)
    np_dtype = np.float32 if dtype == "f32" else np.float16
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", name or f"{base.stem}-lora")
    writer.add_string("adapter.type", ADAPTER_TYPE)
    writer.add_float32("adapter.lora.alpha", float(lora.alpha))
    writer.add_uint32("s2t_edge.lora.rank", int(lora.rank))
    writer.add_string("s2t_edge.lora.target_modules", ",".join(lora.target_modules))
    if base_sha256:
        writer.add_string("s2t_edge.base_sha256", base_sha256)
    for gname, (A, B) in lora.pairs.items():
        writer.add_tensor(f"{gname}.lora_a", A.astype(np_dtype))
        writer.add_tensor(f"{gname}.lora_b", B.astype(np_dtype))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, out)
    return out


def export_lora(
    model: Any,
    base_gguf: str | Path,
    out: str | Path,
    *,
    dtype: str = "f16",
    base_sha256: str | None = None,
) -> tuple[Path, LoraWeights]:
    """`lora_from_peft(model)` written with `write_lora_gguf`: (adapter path, the LoRA)."""
    lora = lora_from_peft(model)
    return write_lora_gguf(lora, base_gguf, out, dtype=dtype, base_sha256=base_sha256), lora
