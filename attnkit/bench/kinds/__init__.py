"""The registered kinds and their implementations (attnkit and every baseline), one module per op:
:mod:`.attention` (dense, causal, window, BigBird, Longformer), :mod:`.score_mods` (Gemma-2 / gpt-oss-style
soft-cap and sinks), :mod:`.linear`, :mod:`.lora`.
Importing this package registers them all."""

from . import attention, linear, lora, score_mods  # noqa: F401  (registers the kinds)
from .attention import SDPA_BACKENDS, SPARSE, SPARSE_BUILDERS, WINDOW, attention_kind, sparse_pattern
from .lora import LORA_HIDDEN_RANK

__all__ = ["attention_kind", "WINDOW", "SDPA_BACKENDS", "SPARSE", "SPARSE_BUILDERS",
           "sparse_pattern", "LORA_HIDDEN_RANK"]
