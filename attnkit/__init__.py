"""attnkit: Triton/CUDA kernels for long-context attention and fused LoRA fine-tuning.

Importing attnkit is light: kernels (and triton) load on first use.
"""

from .attn import (
    Causal,
    Dense,
    MultiheadSelfAttention,
    Pattern,
    RotaryEmbedding,
    SlidingWindow,
    attention,
)

__version__ = "0.1.0"

__all__ = [
    "attention", "Pattern", "Dense", "Causal", "SlidingWindow", "MultiheadSelfAttention",
    "RotaryEmbedding", "__version__",
]
