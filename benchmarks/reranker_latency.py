"""Latency of one S2T-LOCAL reranker call (onnxruntime, one thread), as the decode loop makes it.

python benchmarks/reranker_latency.py [BUNDLE]   # default: the shipped bundle
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from s2t_edge.bundle import default_bundle_path, load_bundle
from s2t_edge.reranker import OnnxReranker


def main() -> None:
    bundle = load_bundle(sys.argv[1] if len(sys.argv) > 1 else default_bundle_path())
    rr = OnnxReranker(bundle.onnx_path)
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((64, rr.n_embd)).astype(np.float32)
    ids = rng.integers(0, bundle.manifest["slm"]["vocab_size"], (64, rr.k))
    logits = np.sort(rng.standard_normal((64, rr.k)).astype(np.float32) * 3, axis=1)[:, ::-1].copy()
    for i in range(100):
        rr.run(hidden[i % 64], ids[i % 64], logits[i % 64])
    times = []
    for i in range(5000):
        t = time.perf_counter()
        rr.run(hidden[i % 64], ids[i % 64], logits[i % 64])
        times.append(time.perf_counter() - t)
    times.sort()
    size = bundle.onnx_path.stat().st_size / 1e6
    print(
        f"reranker.onnx {size:.1f} MB, K={rr.k}: median {statistics.median(times) * 1e6:.1f} us, "
        f"p90 {times[int(0.9 * len(times))] * 1e6:.1f} us, "
        f"p99 {times[int(0.99 * len(times))] * 1e6:.1f} us (5000 calls)"
    )


if __name__ == "__main__":
    main()
