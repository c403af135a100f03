"""Exporting S2T-LOCAL bundles: ONNX reranker + manifest + GGUF (installed as s2t_edge.export)."""
