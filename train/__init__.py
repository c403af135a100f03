"""Training the S2T-LOCAL reranker from collected teacher labels (PyTorch; installed as s2t_edge.train)."""
