"""What users call: patterns, the functional APIs and nn.Modules."""

from .block_sparse import BlockSparse
from .feature_maps import HedgehogFeatureMap
from .functional import attention
from .linear import LinearAttentionState, linear_attention, linear_attention_step
from .modules import MultiheadSelfAttention, RotaryEmbedding
from .patterns import Causal, Dense, Pattern, SlidingWindow
from .sparse_builders import bigbird, from_mask_fn, longformer, strided

__all__ = [
    "attention", "Pattern", "Dense", "Causal", "SlidingWindow", "MultiheadSelfAttention",
    "RotaryEmbedding", "linear_attention", "linear_attention_step", "LinearAttentionState",
    "HedgehogFeatureMap", "BlockSparse", "bigbird", "longformer", "strided", "from_mask_fn",
]
