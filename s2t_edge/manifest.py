"""The one schema of `bundle.json`: every key a bundle manifest holds, its type and its range.

`validate_manifest` checks a parsed manifest against it in one pass and raises one S2TError line
naming the first bad key (`slm.sha256: expected a 64-hex sha256, got 'abc'`), so a hand-edited or
damaged manifest never surfaces as a KeyError / TypeError traceback, and a NaN or out-of-range
threshold is refused instead of silently turning the reranker off (or on at every step).

Format 1 holds an ONNX reranker. Format 2 holds a reranker, a LoRA adapter (`adapter`), or both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from s2t_edge.errors import S2TError

FORMAT_VERSION = 2
FEATURE_VERSION = 1
MAX_K = 32
NEVER_FIRES = 1.01  # the threshold training picks for a reranker that cannot beat greedy

Check = Callable[[Any, str], None]


class ManifestError(S2TError):
    """A manifest that does not match the schema (the message names the key)."""


def _fail(path: str, want: str, got: Any) -> None:
    shown = repr(got)
    raise ManifestError(f"{path}: expected {want}, got {shown[:60] + '…' if len(shown) > 60 else shown}")


def Int(lo: int, hi: int | None = None) -> Check:
    def check(v: Any, path: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            _fail(path, f"an integer in {lo}..{hi if hi is not None else '∞'}", v)

    return check


def Float(lo: float, hi: float) -> Check:
    def check(v: Any, path: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
            _fail(path, f"a finite number in [{lo:g}, {hi:g}]", v)

    return check


def Str(pattern: str = r".+") -> Check:
    rx = re.compile(pattern)

    def check(v: Any, path: str) -> None:
        if not isinstance(v, str) or not rx.fullmatch(v):
            _fail(path, "a 64-hex sha256" if pattern == HEX64 else f"a string matching {pattern}", v)

    return check


def OneOf(*values: str) -> Check:
    def check(v: Any, path: str) -> None:
        if v not in values:
            _fail(path, f"one of {', '.join(values)}", v)

    return check


def Opt(inner: Check) -> Check:
    """`None` or `inner` (a key that must be present, possibly null)."""

    def check(v: Any, path: str) -> None:
        if v is not None:
            inner(v, path)

    return check


def ListOf(inner: Check, min_len: int = 1) -> Check:
    def check(v: Any, path: str) -> None:
        if not isinstance(v, list) or len(v) < min_len:
            _fail(path, f"a list of at least {min_len}", v)
        for i, x in enumerate(v):
            inner(x, f"{path}[{i}]")

    return check


def AnyDict(v: Any, path: str) -> None:
    if not isinstance(v, dict):
        _fail(path, "an object", v)


def Obj(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    """An object with these required keys and these optional ones (others are ignored)."""

    def check(v: Any, path: str) -> None:
        AnyDict(v, path)
        for key, sub in required.items():
            if key not in v:
                raise ManifestError(f"{path + '.' if path else ''}{key}: required key is missing")
            sub(v[key], f"{path + '.' if path else ''}{key}")
        for key, sub in (optional or {}).items():
            if key in v:
                sub(v[key], f"{path + '.' if path else ''}{key}")

    return check


HEX64 = r"[0-9a-f]{64}"
SHA256 = Str(HEX64)
FILENAME = Str(r"[^/\\\x00]+")  # a plain file name inside the bundle, never a path
PROB = Float(0.0, 1.0)

SLM = Obj(
    {
        "name": Str(),
        "sha256": SHA256,
        "fingerprint": SHA256,
        "size": Int(1),
        "vocab_size": Int(1),
        "n_embd": Int(1),
        "bundled_file": Opt(FILENAME),
    }
)
RERANKER = {
    "feature_version": Int(1),
    "threshold": Float(0.0, NEVER_FIRES),
    "onnx_sha256": SHA256,
    "onnx_opset": Int(1, 100),
    "onnx_parity_max_abs_diff": Float(0.0, 1.0),
}
RERANKER_OPTIONAL = {"select_rule": OneOf("best", "alternative")}
ADAPTER_CHECK = Obj(
    {"positions": Int(1), "top1_agreement": PROB, "correlation_mean": Float(-1.0, 1.0)},
    {
        "correlation_min": Float(-1.0, 1.0),
        "base_top1_agreement": PROB,
        "base_correlation_mean": Float(-1.0, 1.0),
        "delta_correlation": Opt(Float(-1.0, 1.0)),
    },
)
ADAPTER = Obj(
    {
        "file": FILENAME,
        "sha256": SHA256,
        "size": Int(1),
        "rank": Int(1, 4096),
        "alpha": Float(1e-12, 1e6),
        "target_modules": ListOf(Str(r"[A-Za-z0-9_.]+")),
        "base_sha256": SHA256,
        "check": ADAPTER_CHECK,
    },
    {"scale": Float(0.0, 100.0), "dtype": OneOf("f32", "f16"), "training": AnyDict},
)
COMMON = {"format_version": Int(1, FORMAT_VERSION), "k": Int(1, MAX_K), "slm": SLM}
COMMON_OPTIONAL: dict[str, Check] = {"training": AnyDict, "packages": AnyDict}


def validate_manifest(m: Any) -> dict:
    """Check a parsed `bundle.json` against the schema; returns it, or raises one S2TError line."""
    if not isinstance(m, dict):
        _fail("manifest", "a JSON object", m)
    version = m.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ManifestError("manifest has no integer format_version; not an s2t-edge bundle")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"bundle format {version} is newer than this s2t-edge reads ({FORMAT_VERSION}); upgrade s2t-edge"
        )
    Obj(COMMON, COMMON_OPTIONAL)(m, "")
    has_reranker = version == 1 or "onnx_sha256" in m
    if has_reranker:
        Obj(RERANKER, RERANKER_OPTIONAL)(m, "")
        if m["feature_version"] != FEATURE_VERSION:
            raise ManifestError(
                f"reranker feature version {m['feature_version']}, this runtime computes version {FEATURE_VERSION}"
            )
    if version >= 2 and m.get("adapter") is not None:
        ADAPTER(m["adapter"], "adapter")
        if m["adapter"]["base_sha256"] != m["slm"]["sha256"]:
            raise ManifestError(
                f"adapter was trained on another SLM (sha256 {m['adapter']['base_sha256'][:12]}…), "
                f"the bundle's SLM is {m['slm']['sha256'][:12]}…"
            )
    elif not has_reranker:
        raise ManifestError("bundle holds neither a reranker (onnx_sha256) nor an adapter")
    return m
