"""One validated attention call, as the flash family's backends see it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dispatch import QueryCall
from .spec import KernelSpec

__all__ = ["AttentionCall"]


@dataclass(frozen=True)
class AttentionCall(QueryCall):
    """What :func:`attnkit.attention` hands its backends after validation.

    Shapes: ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]``, ``v [B, Hkv, Nk, Dv]``; ``valid_keys [B, Nk]`` bool
    (True = attend). With ``cu_seqlens_q`` ``B == 1`` and the ``N`` axis holds ``S`` packed
    sequences, ``max_seqlen_q/k`` the longest of them. ``spec`` is the pattern compiled for the
    call's per-sequence lengths; ``pattern`` is kept for messages only.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: object
    spec: KernelSpec
    scale: float
    valid_keys: torch.Tensor | None
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    max_seqlen_q: int | None
    max_seqlen_k: int | None
    return_lse: bool
    #: Score modifications (``None`` = off): soft-cap value, sink logits ``[Hq]`` fp32, ALiBi
    #: slopes ``[Hq]`` or ``[B, Hq]`` fp32.
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None

    # What the dispatch reads (attnkit/kernels/dispatch.py) -------------------------------------

    @property
    def value_dim(self) -> int:
        """``Dv``: the values' (and the output's) head dim; it may differ from ``D``."""
        return self.v.shape[-1]

    @property
    def needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        s = self.sinks
        return (self.q.requires_grad or self.k.requires_grad or self.v.requires_grad
                or (s is not None and s.requires_grad))

    @property
    def score_mods(self) -> tuple[str, ...]:
        """The score modifications this call uses, by name (a backend declares which it has)."""
        if self.softcap is None and self.sinks is None and self.alibi_slopes is None:
            return ()  # the common case, without building the tuple (dispatch reads this per call)
        return tuple(name for name, on in (("softcap", self.softcap is not None),
                                           ("sinks", self.sinks is not None),
                                           ("alibi", self.alibi_slopes is not None)) if on)

    @property
    def queries(self) -> int:
        return self.q.shape[2]

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def spec_kind(self) -> str:
        return self.spec.kind

    @property
    def grid(self) -> tuple[int, int]:
        """(sequences, query heads): the flash kernels' grid z and y extents."""
        cu = self.cu_seqlens_q
        return (self.q.shape[0] if cu is None else cu.numel() - 1, self.q.shape[1])

    @property
    def rows(self) -> tuple[int, int]:
        """Query and key rows per sequence (the longest packed one with ``cu_seqlens``)."""
        if self.packed:
            return self.max_seqlen_q, self.max_seqlen_k
        return self.q.shape[2], self.k.shape[2]
