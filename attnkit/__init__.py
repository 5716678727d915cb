"""attnkit: Triton/CUDA kernels for long-context attention and fused LoRA fine-tuning.

Importing attnkit is light: kernels (and triton), PEFT and transformers load on first use.
"""

from . import _mkl_warmup, finetune
from ._version import __version__
from .attn import (
    BlockSparse,
    Causal,
    Dense,
    HedgehogFeatureMap,
    LinearAttentionState,
    MultiheadSelfAttention,
    Pattern,
    RotaryEmbedding,
    SlidingWindow,
    attention,
    bigbird,
    from_mask_fn,
    linear_attention,
    linear_attention_step,
    longformer,
    strided,
)
from .finetune import LoRALinear, lora_batched, lora_linear

_mkl_warmup.warm_up()

__all__ = [
    "attention", "Pattern", "Dense", "Causal", "SlidingWindow", "MultiheadSelfAttention",
    "RotaryEmbedding", "linear_attention", "linear_attention_step", "LinearAttentionState",
    "HedgehogFeatureMap", "BlockSparse", "bigbird", "longformer", "strided", "from_mask_fn",
    "finetune", "LoRALinear", "lora_linear", "lora_batched", "__version__",
]
