"""llama.cpp + GGUF LoRA vs torch + peft on the real SLM: what the adapter export check reaches.

The SLM (Q4_K_M) is loaded by transformers from the same GGUF (dequantized to float32); a LoRA
r=16 on q/k/v/o/gate/up/down gets random B (peft initialises it to zero) scaled so the adapter
moves the top-1 at some positions; it is exported to GGUF (f16 and f32) and compared on GSM8K
train questions (never dev). Prints the numbers `export/adapter_check.py`'s quantized thresholds
come from.

    python benchmarks/adapter_parity.py --prompts 8 --b-std 0.002
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="SLM name or .gguf path (default: the registry's SLM)")
    ap.add_argument("--data", default="../shared/datasets/gsm8k/train.jsonl")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--b-std", type=float, default=0.002)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/adapter_parity")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from s2t_edge.export.adapter_check import check_adapter
    from s2t_edge.export.lora_gguf import HF_TO_GGUF, export_lora
    from transformers import AutoModelForCausalLM

    from s2t_edge.store import resolve_model

    torch.set_num_threads(args.threads)
    gguf = Path(resolve_model(args.model))
    lines = Path(args.data).read_text().splitlines()[-args.prompts :]
    prompts = [json.loads(x)["question"] for x in lines]
    t0 = time.time()
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    targets = [m.split(".")[1] for m in HF_TO_GGUF]
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * args.b_std)
    print(f"loaded in {time.time() - t0:.0f}s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for dtype in ("f16", "f32"):
        t0 = time.time()
        path, lora = export_lora(model, gguf, out / f"adapter-{dtype}.gguf", dtype=dtype)
        check = check_adapter(gguf, path, model, prompts, max_tokens=args.max_tokens, n_threads=args.threads)
        size = path.stat().st_size / 1e6
        print(json.dumps({"dtype": dtype, "size_mb": round(size, 1), "seconds": round(time.time() - t0), **check}))


if __name__ == "__main__":
    main()
