"""s2t-edge: Select to Think on a laptop — a small GGUF model reranks its own top-K candidates."""

__version__ = "0.1.0"
