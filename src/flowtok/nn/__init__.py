"""The few layers shared by the tokenizer, the text side and the flow transformer."""

from .attention import Attention
from .embeddings import TimestepEmbedder, sincos_1d, sincos_2d
from .mlp import Mlp, SwiGLU, count_parameters
from .rope import RotaryEmbedding2D, rope_2d_tables, rotate_pairs

__all__ = [
    "Attention", "Mlp", "RotaryEmbedding2D", "SwiGLU", "TimestepEmbedder", "count_parameters", "rope_2d_tables",
    "rotate_pairs", "sincos_1d", "sincos_2d",
]
