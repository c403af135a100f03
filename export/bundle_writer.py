"""`s2t-edge export`: GGUF + verified ONNX reranker + manifest = an S2T-LOCAL bundle."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tarfile
from pathlib import Path

from s2t_edge import __version__
from s2t_edge.bundle import (
    FEATURE_VERSION,
    FORMAT_VERSION,
    MANIFEST,
    ONNX_NAME,
    fingerprint,
    load_bundle,
)
from s2t_edge.errors import S2TError
from s2t_edge.store import check_gguf_file, sha256_file

from ..train.data import output_embedding
from ..train.train import load_checkpoint
from .onnx_export import OPSET, Shipped, check_parity, export_onnx

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


def export_bundle(
    slm: Path,
    ckpt_path: Path,
    out: Path,
    *,
    archive: bool = False,
    quantize: str | None = None,
    include_gguf: bool = True,
    slm_name: str | None = None,
) -> Path:
    """Write the bundle folder `out` (and `out.tar` with `archive`); returns the bundle's path."""
    check_gguf_file(slm)
    model, ckpt = load_checkpoint(ckpt_path)
    report = ckpt["report"]
    out.mkdir(parents=True, exist_ok=True)
    gguf = slm
    if quantize:
        gguf = quantize_gguf(slm, out / f"{slm.stem}-{quantize.lower()}.gguf", quantize)
    emb = output_embedding(gguf)
    if emb.shape[1] != ckpt["n_embd"]:
        raise S2TError(f"reranker was trained on hidden size {ckpt['n_embd']}, {gguf.name} has {emb.shape[1]}")
    sha = sha256_file(gguf)
    if report["groups"].get("slm_sha256") and not quantize and report["groups"]["slm_sha256"] != sha:
        raise S2TError(
            f"reranker was trained on groups from another SLM (sha256 {report['groups']['slm_sha256'][:12]}…), "
            f"not {gguf.name}"
        )
    shipped = Shipped(model, emb if model.use_tokens else None)
    onnx_path = export_onnx(shipped, out / ONNX_NAME)
    inputs = ckpt["parity_inputs"]
    worst = check_parity(shipped, onnx_path, inputs["hidden"], inputs["ids"], inputs["logits"])
    bundled = None
    if include_gguf:
        bundled = gguf.name
        if gguf.parent != out:
            _place_gguf(gguf, out / bundled)
    import onnx
    import onnxruntime
    import torch

    manifest = {
        "format_version": FORMAT_VERSION,
        "feature_version": FEATURE_VERSION,
        "k": model.k,
        "threshold": report["threshold"],
        "select_rule": report.get("rule", "best"),
        "slm": {
            "name": slm_name or gguf.stem,
            "sha256": sha,
            "fingerprint": fingerprint(gguf),
            "size": gguf.stat().st_size,
            "vocab_size": int(emb.shape[0]),
            "n_embd": int(emb.shape[1]),
            "bundled_file": bundled,
        },
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
        "packages": {
            "s2t-edge": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    load_bundle(out)  # the bundle we just wrote must pass our own verification
    if archive:
        tar_path = out.with_suffix(".tar")
        with tarfile.open(tar_path, "w") as tar:
            for f in sorted(out.iterdir()):
                tar.add(f, arcname=f.name)
        return tar_path
    return out
