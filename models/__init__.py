"""Shipped data: the model registry (`registry.json`) and the default S2T-LOCAL bundle.

Installed as `s2t_edge.assets`. Weights are never stored here: `s2t-edge models pull` fetches them.
"""
