"""What a LoRA adapter applied by llama.cpp costs in decode speed, by target modules, rank and dtype.

Writes random adapters for the SLM (the values do not change the cost) and decodes the same
prompts greedily with each and with none, alternating, on the same GGUF and threads; reports the
median tokens/s and the ratio to plain greedy. Decides which adapter shape meets the 0.90x goal.

    python benchmarks/adapter_speed.py [--threads 2] [--tokens 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s2t_edge.export.lora_gguf import HF_TO_GGUF, LoraWeights, base_tensor_shapes, write_lora_gguf  # noqa: E402

from s2t_edge.decode import DecodeStats, decode  # noqa: E402
from s2t_edge.engine import Engine  # noqa: E402
from s2t_edge.store import resolve_model  # noqa: E402

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. How many in all?",
    "Write a Python function that checks whether a number is prime, then explain it.",
    "A train travels 120 km in 1.5 hours. What is its average speed? Explain step by step.",
]
ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
VARIANTS = {  # name -> (HF modules, rank, dtype)
    "all 7, r16, f16": (list(HF_TO_GGUF), 16, "f16"),
    "all 7, r16, f32": (list(HF_TO_GGUF), 16, "f32"),
    "all 7, r8, f16": (list(HF_TO_GGUF), 8, "f16"),
    "attention 4, r16, f16": (ATTN, 16, "f16"),
}


def random_lora(base: Path, modules: list[str], rank: int) -> LoraWeights:
    _, shapes = base_tensor_shapes(base)
    rng = np.random.default_rng(0)
    lora = LoraWeights(rank, 2.0 * rank, [m.split(".")[-1] for m in modules])
    for name, (n_out, n_in) in ((n, s) for n, s in shapes.items() if len(s) == 2):
        if any(name.endswith(f".{HF_TO_GGUF[m]}.weight") for m in modules) and name.startswith("blk."):
            a = rng.normal(0, 0.01, (rank, n_in)).astype(np.float32)
            b = rng.normal(0, 0.001, (n_out, rank)).astype(np.float32)
            lora.pairs[name] = (a, b)
    return lora


def rate(engine: Engine, ids: list[int], n: int) -> float:
    """Decode tokens/s (the prompt's prefill excluded)."""
    stats = DecodeStats()
    for _ in decode(engine, ids, max_tokens=n, stats=stats):
        pass
    return stats.tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    path = resolve_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="adapter-speed-"))
    engines = {"greedy (no adapter)": Engine(path, n_ctx=1024, n_threads=args.threads)}
    sizes = {"greedy (no adapter)": 0}
    for name, (modules, rank, dtype) in VARIANTS.items():
        f = write_lora_gguf(random_lora(path, modules, rank), path, tmp / f"{len(engines)}.gguf", dtype=dtype)
        engines[name], sizes[name] = Engine(path, n_ctx=1024, n_threads=args.threads, lora=f), f.stat().st_size
    prompts = [engines["greedy (no adapter)"].tokenize(p) for p in PROMPTS]
    for e in engines.values():  # warm up
        rate(e, prompts[0], 4)
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.rounds):
        for ids in prompts:
            for name, e in engines.items():
                e.reset()
                rates[name].append(rate(e, ids, args.tokens))
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["greedy (no adapter)"]
    print(f"{path.name}, threads {args.threads}, {args.tokens} tokens x {len(prompts)} prompts x {args.rounds} rounds")
    for name, v in med.items():
        print(f"  {name:<24} {v:6.1f} tok/s   {v / base:.3f}x greedy   adapter {sizes[name] / 1e6:5.1f} MB")


if __name__ == "__main__":
    main()
