"""Decode speed, side by side in one run: our loop vs llama-cpp-python, and the policies' overhead.

Runs alternate (A, B, C, A, B, C, ...) on the same GGUF, threads and prompts, so machine noise
hits every variant alike; reports median tokens/s per variant and ratios to the reference.

    python benchmarks/decode_speed.py [--model PATH] [--bundle PATH] [--threads 2] [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llama_ref import reference_llama  # noqa: E402

from s2t_edge.bundle import default_bundle_path, load_bundle  # noqa: E402
from s2t_edge.decode import decode  # noqa: E402
from s2t_edge.engine import Engine  # noqa: E402
from s2t_edge.policy import Policy, greedy  # noqa: E402
from s2t_edge.reranker import OnnxReranker, S2TLocal  # noqa: E402
from s2t_edge.store import resolve_model  # noqa: E402

PROMPTS = [
    "Write a Python function that checks whether a number is prime, then explain it.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Think step by step.",
    "Explain the difference between a list and a tuple in Python, with examples.",
]


def decode_rate(stream) -> float:
    """Tokens/s after the first token (so prompt prefill is excluded the same way for everyone)."""
    count, t_first = 0, 0.0
    for _ in stream:
        count += 1
        if count == 1:
            t_first = time.perf_counter()
    return (count - 1) / (time.perf_counter() - t_first)


def run_ours(engine: Engine, prompt: list[int], n: int, policy) -> float:
    rate = decode_rate(decode(engine, prompt, max_tokens=n, **policy.decode_args()))
    engine.reset()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ctx", type=int, default=2048)
    args = ap.parse_args()
    path = resolve_model(args.model)
    bundle = load_bundle(args.bundle or default_bundle_path())

    # flash attention on, as our engine gets it from llama.cpp's defaults: same kernels on both sides
    ref = reference_llama(
        path, n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads, n_batch=512, flash_attn=True
    )
    plain = Engine(path, n_ctx=args.ctx, n_threads=args.threads)
    variants = {"ours greedy": (plain, greedy())}  # name -> (engine, policy)
    if bundle.has_reranker:
        hidden = Engine(path, n_ctx=args.ctx, n_threads=args.threads, hidden=True)
        sel = S2TLocal(OnnxReranker(bundle.onnx_path), bundle.threshold, bundle.select_rule)
        variants["ours greedy + hidden"] = (hidden, greedy())
        variants["ours s2t-local"] = (
            hidden,
            Policy("s2t-local", k=bundle.k, trigger=sel, selector=sel, needs_hidden=True),
        )
    if bundle.adapter_path is not None:  # the bundle's LoRA applied by llama.cpp: greedy on the adapted SLM
        adapted = Engine(path, n_ctx=args.ctx, n_threads=args.threads, lora=bundle.adapter_path)
        variants["ours s2t-local (adapter)"] = (adapted, greedy())
    prompts = [plain.tokenize(p) for p in PROMPTS]

    def ref_run(toks: list[int], n: int = args.tokens) -> float:
        ref.reset()
        return decode_rate(ref.create_completion(toks, max_tokens=n, temperature=0.0, top_k=1, stream=True))

    for toks in prompts:  # warm up every variant
        ref_run(toks, 4)
        for engine, policy in variants.values():
            run_ours(engine, toks, 4, policy)

    rates: dict[str, list[float]] = {"llama-cpp-python": [], **{name: [] for name in variants}}
    for _ in range(args.rounds):
        for toks in prompts:
            rates["llama-cpp-python"].append(ref_run(toks))
            for name, (engine, policy) in variants.items():
                rates[name].append(run_ours(engine, toks, args.tokens, policy))
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["llama-cpp-python"]
    print(
        f"model {path.name}, threads {args.threads}, "
        f"{args.tokens} tokens x {len(prompts)} prompts x {args.rounds} rounds"
    )
    for k, v in med.items():
        print(f"  {k:<22} {v:6.1f} tok/s   ratio {v / base:.3f}")
    for name in ("ours s2t-local", "ours s2t-local (adapter)"):
        if name in med:
            print(f"  {name} / ours greedy ratio {med[name] / med['ours greedy']:.3f}")
    print(json.dumps({k: round(v, 2) for k, v in med.items()}))


if __name__ == "__main__":
    main()
