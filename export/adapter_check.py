"""The export check of a LoRA adapter: llama.cpp with the GGUF adapter against torch + peft.

Both sides read the same token ids (the GGUF's own tokenizer) of held-out prompts and produce
logits at every position; per position we compare the top-1 id and the Pearson correlation of the
logits over the vocabulary. The same numbers for the base models (llama.cpp without the adapter,
peft with the adapter disabled) give the floor the quantized base itself sets: llama.cpp computes
with Q4_K weights and 8-bit activations, transformers with the dequantized weights in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError

# Minimums the check's numbers must reach. `top1_vs_base` = top-1 agreement with the adapter minus
# the base models' own: the adapter must not widen the gap the quantized base already has.
# F32 / F16 bases: llama.cpp and torch compute the same function up to float rounding.
EXACT_THRESHOLDS = {"top1_agreement": 0.98, "correlation_mean": 0.99, "delta_correlation": 0.99}
# Quantized bases (Q4_K_M): llama.cpp computes with Q4_K weights and 8-bit activations, torch with
# the dequantized weights. Measured on the real SLM (benchmarks/adapter_parity.py, r=16 on all 7
# modules, 411 positions of 6 GSM8K train questions, f16 and f32 adapters alike; base models alone:
# top-1 0.966, correlation 0.9997): an adapter moving the top-1 at 3.6% of positions gives top-1
# 0.966, correlation 0.9997, delta correlation 0.79; one moving it at 9.0%: 0.978, 0.9997, 0.965.
# The thresholds leave room for other prompts.
QUANTIZED_THRESHOLDS = {
    "top1_agreement": 0.93,
    "correlation_mean": 0.995,
    "delta_correlation": 0.5,
    "top1_vs_base": -0.02,
}
EXACT_FILE_TYPES = (0, 1, 32)  # LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_BF16


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `a` with the same row of `b` ([T, V] → [T])."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)


def _torch_logits(model: Any, ids: Sequence[int], n_vocab: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)], dtype=torch.long)).logits[0]
    if out.shape[-1] < n_vocab:
        raise S2TError(f"the torch model has {out.shape[-1]} logits, the GGUF's vocabulary {n_vocab}")
    return out[:, :n_vocab].float().cpu().numpy()


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(pearson_rows(a[None].astype(np.float64), b[None].astype(np.float64))[0])


def check_adapter(
    gguf_path: str | Path,
    adapter_gguf: str | Path,
    peft_model: Any,
    prompts: Sequence[str | Sequence[int]],
    *,
    scale: float = 1.0,
    max_tokens: int = 128,
    n_threads: int | None = None,
) -> dict:
    """Measure llama.cpp + `adapter_gguf` against `peft_model` (a PeftModel over the same GGUF) on
    `prompts` (text, or token ids such as a prompt and its answer; each cut to `max_tokens` tokens).
    Returns positions, top-1 agreement, mean and min logit correlation, the same for the two base
    models (`base_*`), the GGUF's file type, and `delta_correlation`: how well llama.cpp
    reproduces the adapter's own change of the logits.

    One prompt at a time, one llama.cpp row at a time: memory stays at a few [T, V] arrays."""
    if not prompts:
        raise S2TError("the adapter check needs at least one held-out prompt")
    peft_model.eval()
    top1, corr, base_top1, base_corr, delta, changed = [], [], [], [], [], []
    probe: dict = {}
    with Engine(gguf_path, n_ctx=max_tokens + 8, n_threads=n_threads, lora=adapter_gguf, lora_scale=scale) as eng:
        ftype = int(eng.metadata("general.file_type") or 0)
        for text in prompts:
            ids = list(eng.tokenize(text) if isinstance(text, str) else text)[:max_tokens]
            if not ids:
                continue
            ref_ad = _torch_logits(peft_model, ids, eng.n_vocab)
            with peft_model.disable_adapter():
                ref_base = _torch_logits(peft_model, ids, eng.n_vocab)
            eng.use_lora(True)
            cpp_ad = np.empty_like(ref_ad)
            for pos, row in eng.score(ids, 0):
                cpp_ad[pos] = row
                top1.append(int(row.argmax()) == int(ref_ad[pos].argmax()))
                corr.append(_pearson(row, ref_ad[pos]))
            eng.use_lora(False)
            for pos, row in eng.score(ids, 0):
                base_top1.append(int(row.argmax()) == int(ref_base[pos].argmax()))
                base_corr.append(_pearson(row, ref_base[pos]))
                d_ref = ref_ad[pos] - ref_base[pos]
                changed.append(int(ref_ad[pos].argmax()) != int(ref_base[pos].argmax()))
                if np.abs(d_ref).max() > 1e-6:
                    delta.append(_pearson(cpp_ad[pos] - row, d_ref))
            p = _probe(ids, ref_ad, ref_base)
            if not probe or p["changed"] > probe["changed"]:
                probe = p
    if not top1:
        raise S2TError("the adapter check's prompts tokenize to nothing")
    return {
        "positions": len(top1),
        "top1_agreement": float(np.mean(top1)),
        "top1_vs_base": float(np.mean(top1) - np.mean(base_top1)),
        "correlation_mean": float(np.mean(corr)),
        "correlation_min": float(np.min(corr)),
        "base_top1_agreement": float(np.mean(base_top1)),
        "base_correlation_mean": float(np.mean(base_corr)),
        "delta_correlation": float(np.mean(delta)) if delta else None,
        "adapter_top1_changes": float(np.mean(changed)),
        "file_type": ftype,
        "scale": float(scale),
        "probe": probe,
    }


def _probe(ids: Sequence[int], ref_ad: np.ndarray, ref_base: np.ndarray) -> dict:
    """One prompt's torch top-1 with and without the adapter at every position: a small record in
    the bundle against which the real SLM + adapter is tested (tests/test_integration_slm.py)."""
    ad, base = ref_ad.argmax(1), ref_base.argmax(1)
    return {
        "tokens": [int(t) for t in ids],
        "adapted_top1": ad.tolist(),
        "base_top1": base.tolist(),
        "changed": int((ad != base).sum()),
    }


def thresholds_for(check: dict) -> dict:
    """The thresholds an adapter must reach: exact ones on an F32/F16 base, measured ones on a
    quantized base."""
    return EXACT_THRESHOLDS if check.get("file_type") in EXACT_FILE_TYPES else QUANTIZED_THRESHOLDS


def require_adapter_check(check: dict, thresholds: dict | None = None) -> dict:
    """Raise S2TError (one line) when `check` falls below `thresholds`; returns the thresholds."""
    thr = thresholds or thresholds_for(check)
    low = []
    for key, minimum in thr.items():
        value = check.get(key)
        if value is None and key == "delta_correlation":
            continue  # an adapter that changes nothing: trivially reproduced
        if not (isinstance(value, int | float) and value >= minimum):  # NaN fails too
            low.append(f"{key} {value:.4f} < {minimum}" if isinstance(value, float) else f"{key} {value} < {minimum}")
    if low:
        raise S2TError(
            f"adapter export check failed ({'; '.join(low)} over {check['positions']} positions): llama.cpp with "
            "the GGUF adapter does not compute what torch + peft computes; bundle not written"
        )
    return dict(thr)
