"""The registered kinds and their implementations (attnkit and every baseline), one module per op:
:mod:`.attention` (dense, causal, window, BigBird, Longformer), :mod:`.linear`, :mod:`.lora`.
Importing this package registers them all."""

from . import attention, linear, lora  # noqa: F401  (registers the kinds)
from .attention import SDPA_BACKENDS, SPARSE, SPARSE_BUILDERS, WINDOW, attention_kind, sparse_pattern
from .lora import LORA_HIDDEN_RANK

__all__ = ["attention_kind", "WINDOW", "SDPA_BACKENDS", "SPARSE", "SPARSE_BUILDERS",
           "sparse_pattern", "LORA_HIDDEN_RANK"]
