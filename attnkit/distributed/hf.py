"""Hugging Face transformers under context parallelism: ``attn_implementation="attnkit_cp"``.

Importing this module registers an attention function ``"attnkit_cp"`` with
``transformers.AttentionInterface``. Each rank runs the whole model on its shard of the tokens:

.. code-block:: python

    import attnkit.distributed.hf as cp_hf
    from attnkit.distributed import shard

    cp_hf.configure(group=None, layout="zigzag")
    model.set_attn_implementation("attnkit_cp")
    ids = shard(input_ids, 1, "zigzag")                      # [B, N / world]
    pos = shard(torch.arange(N)[None].expand(B, -1), 1, "zigzag")  # the tokens' true positions
    logits = model(input_ids=ids, position_ids=pos).logits   # the rows of this shard

Everything but attention (embeddings, RoPE from ``position_ids``, MLPs, norms) is per token, so
only the attention layers talk to other ranks, through
:func:`~attnkit.distributed.context_parallel_attention`. The layer's pattern is causal or
bidirectional from the module (``is_causal``), and a ``sliding_window`` of ``w`` tokens becomes
``SlidingWindow(w - 1, 0)``. The mask function registered under the same name hands the layers
the user's 2-D ``attention_mask`` (this rank's ``[B, N / world]`` shard, 1 = token) as a bool key
mask and never builds an ``N x N`` mask: the pattern already says which keys each query sees, in
global positions (transformers' own causal mask would be the local, wrong one).

Not supported (a clear error): a KV cache / generation (queries and keys must be the same shard),
dense 4-D masks, logit soft-capping. Dropout is not applied.
"""

from __future__ import annotations

import torch

from .. import Causal, Dense, SlidingWindow  # attnkit's public API only
from .planner import check_layout
from .ring import context_parallel_attention

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("attnkit.distributed.hf needs transformers >= 4.53 (AttentionInterface, "
                      "AttentionMaskInterface)") from e

__all__ = ["NAME", "configure", "cp_attention_forward", "cp_mask", "register"]

#: The name registered with transformers.
NAME = "attnkit_cp"

_settings: dict = {"group": None, "layout": "contiguous", "backend": "auto"}


def configure(*, group=None, layout: str = "contiguous", backend: str = "auto") -> None:
    """Set the process group, shard layout and attnkit backend every ``"attnkit_cp"`` layer uses
    (the inputs must have been cut with :func:`~attnkit.distributed.shard` in that layout)."""
    _settings.update(group=group, layout=check_layout(layout), backend=backend)


def cp_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                         scaling: float | None = None, sliding_window: int | None = None,
                         softcap: float | None = None, is_causal: bool | None = None, **kwargs):
    """The ``AttentionInterface`` entry: ``query [B, Hq, n, D]``, ``key``/``value [B, Hkv, n, D]``
    of this rank's shard (``n = N / world``); returns ``(out [B, n, Hq, D], None)``."""
    if softcap is not None:
        raise ValueError(f"attnkit_cp: logit soft-capping (softcap={softcap}) is not supported")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"attnkit_cp: queries ({query.shape[2]}) and keys ({key.shape[2]}) must be the same shard; "
            "a KV cache (generation) is not supported under context parallelism (use_cache=False)"
        )
    valid = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attnkit_cp: only a 2-D [B, N / world] padding mask is supported, got a "
                f"{attention_mask.dim()}-D mask {tuple(attention_mask.shape)}"
            )
        # Kept even when this shard has no padding: every rank must pass a mask, or none.
        valid = attention_mask.to(torch.bool)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    if sliding_window is not None:
        w = int(sliding_window) - 1
        pattern = SlidingWindow(w, 0) if is_causal else SlidingWindow(w, w)
    else:
        pattern = Causal() if is_causal else Dense()
    out = context_parallel_attention(query, key, value, pattern, group=_settings["group"],
                                     layout=_settings["layout"], scale=scaling, valid_keys=valid,
                                     backend=_settings["backend"])
    return out.transpose(1, 2).contiguous(), None


def cp_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
            mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """The ``AttentionMaskInterface`` entry: ``None`` or this shard's bool ``[B, n]`` key mask.

    Mask overlays (packing detected from ``position_ids``, which zigzag shards' position jumps
    would suggest, or custom ``or``/``and`` masks) are ignored: the shards are one sequence."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)


def register() -> None:
    """Register ``"attnkit_cp"`` with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, cp_attention_forward)
    AttentionMaskInterface.register(NAME, cp_mask)


register()
