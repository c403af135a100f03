"""Export a trained reranker to ONNX and prove the export computes what torch computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from s2t_edge.errors import S2TError
from s2t_edge.reranker import OnnxReranker

from ..train.model import Reranker

OPSET = 17
PARITY_ATOL = 1e-4


class Shipped(nn.Module):
    """The reranker as shipped: inputs hidden [B,H], ids [B,K], logits [B,K] → scores, trigger prob.

    Token codes come from a precomputed float16 [V, rank] table (the output embedding already
    multiplied by `tok_proj`), so the ONNX file never carries the 151,936 x H embedding itself.
    """

    def __init__(self, model: Reranker, emb: np.ndarray | None) -> None:
        super().__init__()
        self.model = model
        table = torch.zeros(1, model.rank)
        if model.use_tokens:
            with torch.no_grad():
                table = torch.from_numpy(emb).float() @ model.tok_proj.weight.T
        self.register_buffer("table", table.half())

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor):
        codes = self.table[ids].float() if self.model.use_tokens else None
        scores, trig = self.model(hidden, logits, codes)
        return scores, torch.sigmoid(trig)


def export_onnx(shipped: Shipped, path: Path) -> Path:
    """Write the model as ONNX (opset pinned) and run onnx's full checker on it."""
    import onnx

    H, K = shipped.model.h_proj.in_features, shipped.model.k
    example = (torch.zeros(1, H), torch.arange(K, dtype=torch.int64).unsqueeze(0), torch.zeros(1, K))
    batch = {0: "batch"}
    torch.onnx.export(
        shipped.eval(),
        example,
        str(path),
        input_names=["hidden", "ids", "logits"],
        output_names=["scores", "trigger"],
        opset_version=OPSET,
        dynamo=False,
        dynamic_axes={n: batch for n in ("hidden", "ids", "logits", "scores", "trigger")},
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


@torch.no_grad()
def check_parity(shipped: Shipped, onnx_path: Path, hidden: np.ndarray, ids: np.ndarray, logits: np.ndarray) -> float:
    """Max abs difference between torch and onnxruntime, one step at a time as the runtime calls
    it; raises S2TError past 1e-4."""
    ref_s, ref_t = shipped(torch.from_numpy(hidden), torch.from_numpy(ids), torch.from_numpy(logits))
    rr = OnnxReranker(onnx_path)
    worst = 0.0
    for i in range(len(ids)):
        s, t = rr.run(hidden[i], ids[i], logits[i])
        worst = max(worst, float(np.abs(s - ref_s[i].numpy()).max()), abs(t - float(ref_t[i])))
    if worst > PARITY_ATOL:
        raise S2TError(f"ONNX export differs from torch by {worst:.2e} (> {PARITY_ATOL}); bundle not written")
    return worst
