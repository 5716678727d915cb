"""``nn.Module`` building blocks: a self-attention block and a rotary position embedding."""

from __future__ import annotations

import torch
from torch import nn

from .functional import attention
from .inputs import refuse_unknown_kwargs
from .patterns import Causal, Pattern, as_pattern

__all__ = ["MultiheadSelfAttention", "RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) in the "rotate half" layout used by Llama-style models.

    ``forward(x, position_ids)`` rotates ``x [B, H, N, D]`` (``D`` even) by angles
    ``position * base ** (-2i / D)``; ``position_ids`` is ``[N]`` or ``[B, N]`` (default
    ``arange(N)``). Computed in float32 and cast back to ``x``'s dtype.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[-2]
        if position_ids is None:
            position_ids = torch.arange(n, device=x.device)
        pos = position_ids.to(torch.float32)
        angles = pos[..., None] * self.inv_freq  # [N, D/2] or [B, N, D/2]
        if angles.dim() == 3:
            angles = angles[:, None]  # broadcast over heads
        cos = torch.cat((angles.cos(), angles.cos()), -1)
        sin = torch.cat((angles.sin(), angles.sin()), -1)
        xf = x.float()
        half = self.head_dim // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), -1)
        return (xf * cos + rotated * sin).to(x.dtype)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with q/k/v/o projections, GQA, optional RoPE and an attention pattern.

    ``forward(x [B, N, E], *, valid_keys [B, N] bool = None, position_ids = None) -> [B, N, E]``;
    ``valid_keys`` is True for real tokens and False for padding (see :func:`attnkit.attention`).
    Projections produce ``[B, N, H, D]`` which reach :func:`attnkit.attention` as transposed views
    (no copy), so any backend and pattern the functional API supports works here.

    Args:
        embed_dim: model width ``E``.
        num_heads: query heads ``Hq``.
        num_kv_heads: key/value heads ``Hkv`` (``Hq % Hkv == 0``); default ``num_heads``.
        head_dim: per-head width ``D``; default ``embed_dim // num_heads``.
        pattern: an attnkit pattern; default :class:`~attnkit.Causal` (a decoder block).
        rotary: apply :class:`RotaryEmbedding` to q and k.
        bias: biases on the projections.
        backend: passed to :func:`attnkit.attention`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        pattern: Pattern | None = None,
        *,
        rotary: bool = True,
        rope_base: float = 10000.0,
        bias: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"embed_dim ({embed_dim}) is not divisible by num_heads ({num_heads}); pass head_dim"
                )
            head_dim = embed_dim // num_heads
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = (
            embed_dim, num_heads, num_kv_heads, head_dim,
        )
        self.pattern = Causal() if pattern is None else as_pattern(pattern)
        self.backend = backend
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, **kw)
        self.rotary = RotaryEmbedding(head_dim, rope_base) if rotary else None

    def forward(
        self,
        x: torch.Tensor,
        *,
        valid_keys: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **removed,
    ) -> torch.Tensor:
        refuse_unknown_kwargs("MultiheadSelfAttention.forward", removed)
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [B, N, {self.embed_dim}], got shape {tuple(x.shape)}")
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, position_ids), self.rotary(k, position_ids)
        o = attention(q, k, v, self.pattern, valid_keys=valid_keys, backend=self.backend)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, pattern={self.pattern}, "
            f"rotary={self.rotary is not None}"
        )

