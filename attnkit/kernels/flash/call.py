"""One validated attention call, as the flash family's backends see it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..dispatch import QueryCall
from .spec import KernelSpec

__all__ = ["AttentionCall", "LaunchSlot"]


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
    #: Where a backend keeps what it prebuilt for this call's signature (``None``: nothing is
    #: kept; ``attnkit.attention`` gives each cached signature one, see :class:`LaunchSlot`).
    launch_slot: LaunchSlot | None = field(default=None, compare=False, repr=False)

    @classmethod
    def bind(cls, fields: dict, q, k, v, valid_keys, sinks, alibi_slopes) -> AttentionCall:
        """A call from a validated call's non-tensor ``fields`` (:meth:`fields_of`) and this
        call's tensors, without the dataclass ``__init__`` (measured ~3 us for 17 frozen fields
        against ~0.6 us here; the hot path of a cached signature)."""
        call = object.__new__(cls)
        d = call.__dict__
        d.update(fields)
        d["q"], d["k"], d["v"] = q, k, v
        d["valid_keys"], d["sinks"], d["alibi_slopes"] = valid_keys, sinks, alibi_slopes
        return call

    def fields_of(self) -> dict:
        """The fields :meth:`bind` takes: all but the per-call tensors (no reference to them is
        kept, so a cached copy pins no activations). Packed calls are never bound."""
        d = dict(self.__dict__)
        for name in ("q", "k", "v", "valid_keys", "sinks", "alibi_slopes"):
            d[name] = None
        return d

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


class LaunchSlot:
    """A backend's cache for one call signature (what ``attnkit.attention`` keys its cache on:
    shapes, strides, dtypes, devices, pattern, scale, flags; see ``attn/inputs.py``
    ``call_signature``). The Triton flash backend keeps its :class:`~.launch.FlashPlan` in
    :attr:`plan`."""

    __slots__ = ("plan",)

    def __init__(self) -> None:
        self.plan = None
