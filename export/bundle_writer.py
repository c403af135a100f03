"""`s2t-edge export`: GGUF + verified LoRA adapter and/or ONNX reranker + manifest = an S2T-LOCAL bundle."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2t_edge import __version__
from s2t_edge.bundle import (
    ADAPTER_NAME,
    FEATURE_VERSION,
    FORMAT_VERSION,
    MANIFEST,
    ONNX_NAME,
    fingerprint,
    load_adapter_bundle,
    load_bundle,
)
from s2t_edge.errors import S2TError
from s2t_edge.store import check_gguf_file, sha256_file

QUANT_TYPES = {"Q4_K_M": 15, "Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* values


def quantize_gguf(src: Path, dst: Path, qtype: str, threads: int | None = None) -> Path:
    """Requantize a higher-precision GGUF with llama.cpp's own quantizer."""
    import llama_cpp

    if qtype not in QUANT_TYPES:
        raise S2TError(f"unknown --quantize {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = threads or 0
    tmp = dst.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise S2TError(f"llama.cpp could not quantize {src} to {qtype} (code {rc}); is it F16/F32/BF16?")
    os.replace(tmp, dst)
    return dst


def _place_gguf(src: Path, dst: Path) -> None:
    """Hard-link the GGUF into the bundle when possible (no copy of half a gigabyte), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@dataclass
class AdapterExport:
    """What a trained LoRA brings to `export_bundle`: the PeftModel (over the SLM loaded from the
    very GGUF being bundled), held-out prompts for the export check, and its training record."""

    model: Any
    prompts: Sequence[str | Sequence[int]]  # text, or token ids (a prompt with its answer: what it was trained on)
    k: int = 8  # candidates s2t-local shows per step (the K the adapter was trained over)
    training: dict = field(default_factory=dict)  # data, config, metrics: JSON-serialisable
    base_sha256: str | None = None  # sha256 of the GGUF it was trained on (checked when given)
    dtype: str = "f16"
    scale: float = 1.0
    thresholds: dict | None = None  # default: adapter_check.thresholds_for(the check)
    check_tokens: int = 128  # positions of each prompt the export check compares


def _adapter_section(gguf: Path, sha: str, adapter: AdapterExport, out: Path) -> dict:
    """Write `out/adapter.gguf`, check it against torch + peft, return the manifest's section."""
    from .adapter_check import check_adapter, require_adapter_check
    from .lora_gguf import export_lora

    if adapter.base_sha256 and adapter.base_sha256 != sha:
        raise S2TError(
            f"adapter was trained on another GGUF (sha256 {adapter.base_sha256[:12]}…), not {gguf.name}; "
            "export it with the GGUF it was trained on"
        )
    path = out / ADAPTER_NAME
    try:
        path, lora = export_lora(adapter.model, gguf, path, dtype=adapter.dtype, base_sha256=sha)
        check = check_adapter(
            gguf, path, adapter.model, adapter.prompts, scale=adapter.scale, max_tokens=adapter.check_tokens
        )
        thresholds = require_adapter_check(check, adapter.thresholds)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return {
        "file": ADAPTER_NAME,
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "rank": lora.rank,
        "alpha": lora.alpha,
        "target_modules": lora.target_modules,
        "dtype": adapter.dtype,
        "scale": adapter.scale,
        "base_sha256": sha,
        "n_params": lora.n_params,
        "check": {**check, "thresholds": thresholds},
        "training": adapter.training,
    }


def _reranker_fields(gguf: Path, sha: str, ckpt_path: Path, out: Path, quantized: bool) -> tuple[dict, dict]:
    """Export and parity-check the ONNX reranker: (its manifest fields, package versions)."""
    import onnx
    import onnxruntime
    import torch

    from ..train.data import output_embedding
    from ..train.train import load_checkpoint
    from .onnx_export import OPSET, Shipped, check_parity, export_onnx

    model, ckpt = load_checkpoint(ckpt_path)
    report = ckpt["report"]
    emb = output_embedding(gguf)
    if emb.shape[1] != ckpt["n_embd"]:
        raise S2TError(f"reranker was trained on hidden size {ckpt['n_embd']}, {gguf.name} has {emb.shape[1]}")
    if report["groups"].get("slm_sha256") and not quantized and report["groups"]["slm_sha256"] != sha:
        raise S2TError(
            f"reranker was trained on groups from another SLM (sha256 {report['groups']['slm_sha256'][:12]}…), "
            f"not {gguf.name}"
        )
    shipped = Shipped(model, emb if model.use_tokens else None)
    onnx_path = export_onnx(shipped, out / ONNX_NAME)
    inputs = ckpt["parity_inputs"]
    worst = check_parity(shipped, onnx_path, inputs["hidden"], inputs["ids"], inputs["logits"])
    fields = {
        "feature_version": FEATURE_VERSION,
        "k": model.k,
        "threshold": report["threshold"],
        "select_rule": report.get("rule", "best"),
        "onnx_sha256": sha256_file(onnx_path),
        "onnx_opset": OPSET,
        "onnx_parity_max_abs_diff": worst,
        "training": {
            "groups": report["groups"],
            "config": report["config"],
            "test": report["test"],
            "val": report["val"],
            "problems": report["problems"],
        },
    }
    return fields, {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _check_pairing(fields: dict, k: int, reused_sha: str | None) -> None:
    """A reranker (its manifest `fields`; none if empty) beside an adapter must rank the adapter's K,
    and beside a reused adapter it must have been trained on that adapter's groups."""
    if not fields:
        return
    if fields["k"] != k:
        raise S2TError(f"the reranker ranks top-{fields['k']}, the adapter was trained over top-{k}")
    trained_on = fields["training"]["groups"].get("adapter_sha256")
    if reused_sha is not None and trained_on != reused_sha:
        what = "the base SLM" if trained_on is None else f"another adapter ({trained_on[:12]}…)"
        raise S2TError(f"the reranker was trained on groups of {what}, not of this adapter: collect with --bundle")


def _adapter_packages() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "gguf"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def export_bundle(
    slm: Path,
    ckpt_path: Path | None,
    out: Path,
    *,
    adapter: AdapterExport | Path | None = None,
    archive: bool = False,
    quantize: str | None = None,
    include_gguf: bool = True,
    slm_name: str | None = None,
) -> Path:
    """Write the bundle folder `out` (and `out.tar` with `archive`); returns the bundle's path.

    The bundle holds the reranker of `ckpt_path` (reranker.pt), the LoRA `adapter`, or both;
    each is checked against what it was trained as before the manifest is written. `adapter` as
    a bundle's path reuses that bundle's checked adapter (for a reranker trained on its groups)."""
    check_gguf_file(slm)
    if ckpt_path is None and adapter is None:
        raise S2TError("a bundle needs a reranker checkpoint, an adapter, or both")
    if adapter is not None and quantize:
        raise S2TError("an adapter runs on the GGUF it was trained on: quantize first, train, then export")
    out.mkdir(parents=True, exist_ok=True)
    gguf = slm
    if quantize:
        gguf = quantize_gguf(slm, out / f"{slm.stem}-{quantize.lower()}.gguf", quantize)
    from .lora_gguf import base_tensor_shapes

    n_vocab, n_embd = base_tensor_shapes(gguf)[1]["token_embd.weight"]
    sha = sha256_file(gguf)
    fields, packages = ({}, {}) if ckpt_path is None else _reranker_fields(gguf, sha, ckpt_path, out, bool(quantize))
    section, k = None, 8
    if isinstance(adapter, Path):  # a bundle's adapter, already checked at its export: reused as it is
        src = load_adapter_bundle(adapter, gguf, "to reuse", int(n_vocab))
        section, k = dict(src.adapter), src.manifest["k"]
        _check_pairing(fields, k, section["sha256"])
        shutil.copyfile(src.adapter_path, out / ADAPTER_NAME)
    elif adapter is not None:
        _check_pairing(fields, adapter.k, None)
        section, k = _adapter_section(gguf, sha, adapter, out), adapter.k
        packages.update(_adapter_packages())
    bundled = None
    if include_gguf:
        bundled = gguf.name
        if gguf.parent != out:
            _place_gguf(gguf, out / bundled)
    manifest = {
        "format_version": FORMAT_VERSION,
        "k": fields.pop("k", k),
        **{name: value for name, value in fields.items() if name != "training"},
        "slm": {
            "name": slm_name or gguf.stem,
            "sha256": sha,
            "fingerprint": fingerprint(gguf),
            "size": gguf.stat().st_size,
            "vocab_size": int(n_vocab),
            "n_embd": int(n_embd),
            "bundled_file": bundled,
        },
        "adapter": section,
        **({"training": fields["training"]} if "training" in fields else {}),
        "packages": {"s2t-edge": __version__, **packages},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    load_bundle(out).check_slm(gguf, int(n_vocab))  # what we just wrote must pass our own verification
    if archive:
        tar_path = out.with_suffix(".tar")
        with tarfile.open(tar_path, "w") as tar:
            for f in sorted(out.iterdir()):
                tar.add(f, arcname=f.name)
        return tar_path
    return out
