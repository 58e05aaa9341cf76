"""The few layers shared by the tokenizer, the text side and the flow transformer."""

from .attention import Attention
from .embeddings import TimestepEmbedder, sincos_1d, sincos_2d
from .mlp import Mlp, SwiGLU

__all__ = ["Attention", "Mlp", "SwiGLU", "TimestepEmbedder", "sincos_1d", "sincos_2d"]
