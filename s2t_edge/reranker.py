"""The S2T-LOCAL reranker at runtime: one ONNX session, called on what the SLM already computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from s2t_edge.candidates import Step
from s2t_edge.errors import S2TError


class OnnxReranker:
    """onnxruntime session built once: one thread, no spinning (the SLM owns the cores)."""

    def __init__(self, onnx_path: str | Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise S2TError(f"{onnx_path}: onnxruntime cannot load this reranker ({str(e).splitlines()[0]})") from e
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        if set(shapes) != {"hidden", "ids", "logits"}:
            raise S2TError(f"{onnx_path}: unexpected reranker inputs {sorted(shapes)}")
        self.n_embd, self.k = shapes["hidden"][1], shapes["ids"][1]

    def run(self, hidden: np.ndarray, ids: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, float]:
        """Scores of the K candidates and the trigger probability for one step."""
        scores, trig = self.session.run(
            None,
            {
                "hidden": hidden.reshape(1, -1).astype(np.float32, copy=False),
                "ids": ids.reshape(1, -1).astype(np.int64, copy=False),
                "logits": logits.reshape(1, -1).astype(np.float32, copy=False),
            },
        )
        return scores[0], float(trig[0])


class S2TLocal:
    """Trigger and selector in one: fire where the reranker's trigger probability reaches the
    bundle's threshold, then take the best-scored candidate (rule "best") or the best-scored
    candidate other than the SLM's top-1 (rule "alternative"). One ONNX call per step."""

    name = "s2t-local"

    def __init__(self, reranker: OnnxReranker, threshold: float, rule: str = "best") -> None:
        if rule not in ("best", "alternative"):
            raise S2TError(f"unknown selection rule {rule!r} in the bundle")
        self.reranker, self.threshold, self.first = reranker, threshold, 0 if rule == "best" else 1
        self._scores: np.ndarray | None = None

    def fires(self, step: Step) -> bool:
        if step.hidden is None:
            raise S2TError("s2t-local needs the SLM's hidden state (engine built with hidden=True)")
        c = step.cands
        self._scores, trig = self.reranker.run(step.hidden, c.ids[: self.reranker.k], c.logits[: self.reranker.k])
        return trig >= self.threshold

    def select(self, step: Step) -> int:
        return int(step.cands.ids[self.first + int(np.argmax(self._scores[self.first :]))])
