"""What users call: patterns, the functional API and nn.Modules."""

from .functional import attention
from .modules import MultiheadSelfAttention, RotaryEmbedding
from .patterns import Causal, Dense, Pattern, SlidingWindow

__all__ = [
    "attention", "Pattern", "Dense", "Causal", "SlidingWindow", "MultiheadSelfAttention",
    "RotaryEmbedding",
]
