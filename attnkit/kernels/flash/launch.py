"""Launchers of the flash kernels: one call's arguments (:class:`FlashArgs`), what the kernels
share for every call of its signature (:class:`_Launch`), the launches prebuilt for a signature
(:class:`FlashPlan`: forward and backward, only the tensors added per call), and the one-call
launchers :func:`_fwd_impl` / :func:`_bwd_impl` (the custom ops' implementations)."""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
import triton

from ..autotune import relax_specialization
from .bwd_fused import _dkdv_fused, _dkdv_split, deterministic_backward
from .kernels_bwd import _bwd_preprocess
from .spec import split_full_partial
from .tiles import INTERPRET, _block_d, _dq, _fwd, _n_bucket, _precision, _tile_meta
from .tma import ensure_allocator, tma_ok

#: Tests set this to fill every output with NaN before a kernel runs, so that an element a kernel
#: forgets to write shows up as NaN instead of as stale memory that happens to look right.
POISON_OUTPUTS = False


def _alloc(like: torch.Tensor, shape=None, dtype=None, tail=None) -> torch.Tensor:
    """An output buffer like ``like`` (same strides unless ``shape`` is given).

    ``tail = (cu_seqlens, value)``: packed rows past the last sequence (``N > cu_seqlens[-1]``)
    belong to no sequence and no kernel writes them; they get ``value`` (a device-side mask, no
    host sync). Everything else is left to the kernels (NaN under the tests' poisoning).
    """
    if shape is None:
        out = torch.empty_like(like, dtype=dtype)
    else:
        out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    if tail is not None:
        cu, value = tail
        rows = torch.arange(out.shape[2], device=out.device) >= cu[-1]
        out.masked_fill_(rows.view(-1, *([1] * (out.dim() - 3))), value)
    return out


def _kv_span(kpm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last attended key of each batch row (no host sync)."""
    nk = kpm.shape[1]
    idx = torch.arange(nk, device=kpm.device, dtype=torch.int32)
    hi = torch.where(kpm, idx + 1, torch.zeros_like(idx)).amax(1).to(torch.int32)
    lo = torch.where(kpm, idx, torch.full_like(idx, nk)).amin(1).to(torch.int32)
    return lo, hi


#: ``split_full_partial`` results per key-list tensor: a pattern compiles its lists once and every
#: call passes the same tensors, so the reordering runs once, not per call (``id`` -> (weak
#: reference, nk, block size, result); the weak reference guards against a reused ``id``).
_SPLIT_CACHE: dict[int, tuple] = {}


def _full_partial(kv_num, kv_idx, kv_part, block_size: int, nk: int):
    hit = _SPLIT_CACHE.get(id(kv_idx))
    if hit is not None and hit[0]() is kv_idx and hit[1:3] == (nk, block_size) \
            and hit[3] == kv_idx._version:
        return hit[4]
    out = split_full_partial(kv_num, kv_idx, kv_part, block_size, nk)
    if len(_SPLIT_CACHE) >= 64:
        _SPLIT_CACHE.pop(next(iter(_SPLIT_CACHE)))
    _SPLIT_CACHE[id(kv_idx)] = (weakref.ref(kv_idx), nk, block_size, kv_idx._version, out)
    return out


def _nk_align(a, nk: int, varlen: bool) -> int:
    """The largest key tile (16 ... 128) that divides Nk when the walk has no band edge: the
    kernels then compile one unmasked loop (``EVEN``); 1 (never even) otherwise."""
    if varlen or a.sparse or a.left >= 0 or a.right >= 0:
        return 1
    return next((t for t in (128, 64, 32, 16) if nk % t == 0), 1)


# --------------------------------------------------------------------------------------------
# One call's arguments, from the kernel spec to the custom op and back
# --------------------------------------------------------------------------------------------

_Opt = torch.Tensor | None


@dataclass(frozen=True)
class FlashArgs:
    """Everything the flash kernels take for one call, in one place.

    ``q [B, Hq, Nq, D]``, ``k``/``v [B, Hkv, Nk, D]``; ``kpm [B, Nk]`` bool (True = attend);
    ``cu_q``/``cu_k [S + 1]`` int32 with ``max_q``/``max_k`` (packed sequences); ``lists`` the
    block-sparse tensors ``(kv_num, kv_idx, kv_part, q_num, q_idx, q_part, masks)`` with
    ``block_size``/``layout_batch``/``layout_heads``; ``left``/``right`` the band (``-1`` =
    unbounded; ignored with lists). :meth:`op_args` / :meth:`from_op_args` are the only place
    that knows the custom ops' flat schema; every kernel flag derives from which fields are set.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    # tensors are left out of the repr: a FlashArgs in a log must not print megabytes
    kpm: _Opt = field(default=None, repr=False)
    cu_q: _Opt = field(default=None, repr=False)
    cu_k: _Opt = field(default=None, repr=False)
    # block-sparse lists
    block_size: int = 0
    layout_batch: int = 0
    layout_heads: int = 0
    lists: tuple[_Opt, ...] = field(default=(None,) * 7, repr=False)
    # packed sequences
    max_q: int = 0
    max_k: int = 0
    # scores
    scale: float = 1.0
    sinks: _Opt = field(default=None, repr=False)
    alibi: _Opt = field(default=None, repr=False)
    softcap: float = 0.0
    # the band (-1 = unbounded)
    left: int = -1
    right: int = -1
    # first and one-past-last attended key per batch row [B] int32 (from kpm, by _kv_span):
    # computed once per call and shared by the forward and the backward
    kv_lo: _Opt = field(default=None, repr=False)
    kv_hi: _Opt = field(default=None, repr=False)

    #: The tensors, in schema order (autograd returns gradients for q, k, v and sinks).
    TENSORS = ("q", "k", "v", "sinks", "kpm", "cu_q", "cu_k", "alibi", "kv_lo", "kv_hi")

    @classmethod
    def from_call(cls, call) -> FlashArgs:
        """From a validated :class:`~attnkit.kernels.flash.call.AttentionCall`. A key mask's span
        (:func:`_kv_span`) is computed here, once for the forward and the backward."""
        spec = call.spec
        kpm = call.valid_keys
        kv_lo, kv_hi = _kv_span(kpm) if kpm is not None else (None, None)
        common = dict(q=call.q, k=call.k, v=call.v, kpm=kpm, cu_q=call.cu_seqlens_q,
                      cu_k=call.cu_seqlens_k, max_q=int(call.max_seqlen_q or 0),
                      max_k=int(call.max_seqlen_k or 0), scale=float(call.scale), sinks=call.sinks,
                      alibi=call.alibi_slopes, softcap=float(call.softcap or 0.0), kv_lo=kv_lo,
                      kv_hi=kv_hi)
        if spec.kind == "block_sparse":
            return cls(block_size=spec.block_size, layout_batch=spec.layout_batch,
                       layout_heads=spec.layout_heads,
                       lists=(spec.kv_num, spec.kv_idx, spec.kv_part, spec.q_num, spec.q_idx,
                              spec.q_part, spec.masks), **common)
        left, right = spec.offsets()
        return cls(left=left, right=right, **common)

    def op_args(self) -> tuple:
        """The custom ops' flat arguments: :attr:`TENSORS`, the seven block lists, then the ints
        and floats (``block_size ... softcap``)."""
        return (self.q, self.k, self.v, self.sinks, self.kpm, self.cu_q, self.cu_k, self.alibi,
                self.kv_lo, self.kv_hi, *self.lists, self.block_size, self.layout_batch,
                self.layout_heads, self.max_q, self.max_k, self.scale, self.left, self.right,
                self.softcap)

    @classmethod
    def from_op_args(cls, args) -> FlashArgs:
        t = len(cls.TENSORS)
        tensors = dict(zip(cls.TENSORS, args[:t], strict=True))
        lists = tuple(args[t:t + 7])
        bs, lb, lh, max_q, max_k, scale, left, right, softcap = args[t + 7:]
        return cls(**tensors, lists=lists, block_size=bs, layout_batch=lb, layout_heads=lh,
                   max_q=max_q, max_k=max_k, scale=scale, left=left, right=right, softcap=softcap)

    @property
    def n_tensor_inputs(self) -> int:
        return len(self.TENSORS) + len(self.lists)

    @property
    def sparse(self) -> bool:
        return self.lists[0] is not None


# triton.next_power_of_2 is a constexpr function in triton 3.9 (~2 us a call on the host, and a
# launch needs three): the few distinct head dims and lengths are remembered.
_block_d_of = functools.lru_cache(maxsize=64)(_block_d)
_n_bucket_of = functools.lru_cache(maxsize=256)(_n_bucket)
# N changes with every length: not specialised on (autotune.VARYING_INTS)
relax_specialization(_bwd_preprocess)


class _Launch:
    """What the three kernels share for every call of one signature: grid extents, ints, flags
    and the pattern's block lists, as keyword arguments named like the kernels' parameters
    (:attr:`common`, :attr:`rows_lists` for the query-row walkers, :attr:`cols_lists` for the
    key-column one). The call's own tensors (q/k/v, the key mask and its span, ALiBi slopes,
    ``cu_seqlens``) and the fp32 precision setting are not in them: :class:`FlashPlan` passes
    those per call, so a cached plan holds no activation.

    Host time matters here (~13 us before the helpers above and the single pass over the optional
    inputs, ~5 us after, kernel launches stubbed): every optional input is looked at once."""

    def __init__(self, a: FlashArgs):
        q, k = a.q, a.k
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        dv = a.v.shape[-1]
        self.Hq, self.Hkv, self.Nq, self.Nk, self.D = Hq, Hkv, Nq, Nk, D
        cu_q = a.cu_q
        varlen = self.varlen = cu_q is not None
        self.n_prog_b = (cu_q.numel() - 1) if varlen else B
        rows_q = self.rows_q = a.max_q if varlen else Nq
        self.rows_k = a.max_k if varlen else Nk
        kv_num, kv_idx, kv_part, q_num, q_idx, q_part, masks = a.lists
        sparse = kv_num is not None
        common = dict(
            PMASK=masks, sm_scale=a.scale, softcap=a.softcap,
            HAS_SOFTCAP=a.softcap > 0, GROUP=Hq // Hkv, NQ=Nq, NK=Nk,
            WIN_L=max(a.left, 0), WIN_R=max(a.right, 0), N_BUCKET=_n_bucket_of(rows_q),
            # flags: each derives from which inputs are present
            HEAD_DIM=D, BLOCK_D=_block_d_of(D), HEAD_DV=dv, BLOCK_DV=_block_d_of(dv),
            HAS_LEFT=a.left >= 0 and not sparse, HAS_RIGHT=a.right >= 0 and not sparse,
            VARLEN=varlen, UPCAST=INTERPRET and q.dtype == torch.bfloat16, SPARSE=sparse,
        )
        alibi = a.alibi
        if alibi is None:
            common.update(HAS_ALIBI=False, sab=0, sah=0)
        else:
            common.update(HAS_ALIBI=True, sah=alibi.stride(-1),
                          sab=alibi.stride(0) if alibi.dim() == 2 else 0)
        kpm = a.kpm
        self.kv_lo, self.kv_hi = a.kv_lo, a.kv_hi
        if kpm is None:
            common.update(HAS_KPM=False, smb=0, smn=0)
        else:
            if self.kv_lo is None:  # a FlashArgs built by hand, not by from_call
                self.kv_lo, self.kv_hi = _kv_span(kpm)
            common.update(HAS_KPM=True, smb=kpm.stride(0), smn=kpm.stride(1))
        if sparse:
            lb, lh, bs = a.layout_batch, a.layout_heads, a.block_size
            common.update(LB_STRIDE=lh if lb > 1 else 0, LH_STRIDE=1 if lh > 1 else 0, BS=bs)
            # the query-row walkers (forward, dQ) take the key lists with full blocks first
            # (spec.split_full_partial)
            kv_full, kv_idx, kv_part = _full_partial(kv_num, kv_idx, kv_part, bs, self.rows_k)
            self.rows_lists = dict(KV_NUM=kv_num, KV_NFULL=kv_full, KV_IDX=kv_idx,
                                   KV_PART=kv_part, NROWB=kv_num.shape[1], MAXK=kv_idx.shape[2])
            self.cols_lists = dict(Q_NUM=q_num, Q_IDX=q_idx, Q_PART=q_part,
                                   NCOLB=q_num.shape[1], MAXQ=q_idx.shape[2])
        else:
            bs = 0
            common.update(LB_STRIDE=0, LH_STRIDE=0, BS=0)
            self.rows_lists = dict(KV_NUM=None, KV_NFULL=None, KV_IDX=None, KV_PART=None,
                                   NROWB=0, MAXK=0)
            self.cols_lists = dict(Q_NUM=None, Q_IDX=None, Q_PART=None, NCOLB=0, MAXQ=0)
        self.rows_lists["NK_ALIGN"] = _nk_align(a, Nk, varlen)  # the key-tile alignment
        common.update(_tile_meta(bs))  # {} on a GPU: the autotuner picks the tile
        self.common = common


_STRIDE_NAMES: dict[str, tuple[str, ...]] = {}


def _strides(prefix: str, t: torch.Tensor) -> dict:
    """``{prefix}b, {prefix}h, {prefix}n, {prefix}d`` (or the first three) strides of ``t``."""
    names = _STRIDE_NAMES.get(prefix)
    if names is None:
        names = _STRIDE_NAMES[prefix] = tuple(prefix + s for s in "bhnd")
    return dict(zip(names, t.stride(), strict=False))


class FlashPlan:
    """The launches of one call *signature*, prebuilt: every keyword argument of the forward and
    backward kernels that does not change from call to call (shapes, strides, flags, scale,
    block lists, the grid), so that a call only allocates its outputs and adds its tensors.

    A signature is everything a :class:`FlashArgs` fixes except its tensors' data: shapes,
    strides and dtypes of ``q``/``k``/``v``/``kpm``/``alibi``, which optional inputs are present,
    the band or block lists, the scale, soft-cap and packed maxima. The plan keeps no reference
    to a call's tensors (only the pattern's block lists, which the pattern owns), so a cached plan
    pins no activations. ``attnkit.attention`` caches one per signature
    (``attnkit/attn/functional.py``); :func:`_fwd_impl` / :func:`_bwd_impl` build one per call.

    Measured (``attnkit bench --host-overhead``, launches stubbed, causal B2 H16 N512 D128 bf16,
    shared 2-core CPU): :meth:`forward` of a cached plan 9.4 - 10.2 us, outputs included, against
    25 - 30 us for :func:`_fwd_impl` (``_Launch``, the plan and its first forward) and 35 - 38 us
    for the per-call argument building this replaced. The backward's shared arguments are built at
    its first backward (``_bwd_args``) and reused: only ``do``/``dlse``/``o``/``lse`` strides
    are read per call."""

    def __init__(self, a: FlashArgs, c: _Launch | None = None):
        c = c or _Launch(a)
        q = a.q
        self.interpret = INTERPRET
        self.varlen = c.varlen
        self.Hq, self.Hkv, self.Nq, self.Nk, self.D = c.Hq, c.Hkv, c.Nq, c.Nk, c.D
        self.dv = a.v.shape[-1]
        self.device, self.dtype = q.device, q.dtype
        self.lse_shape = (q.shape[0], c.Hq, c.Nq)
        self.o_shape = None if self.dv == c.D else (*q.shape[:3], self.dv)
        self.scale = a.scale
        self.sparse = a.sparse
        # the sparse lists' source: the plan is stale if the pattern's lists were written in place
        self.lists_src = a.lists[1]
        self.lists_version = a.lists[1]._version if a.sparse else 0
        # the folded softmax tracks the max of raw scores (needs scale >= 0): softmax(s * q.k) =
        # softmax(|s| * (-q).k), the same o and lse (a negated copy of q, for this rare case only)
        self.negate_q = a.scale < 0 and not (a.softcap > 0 or a.alibi is not None)
        # TMA for K/V on the one-loop (EVEN) walk; the strides and pointers are checked per call
        self.tma_walk = c.rows_lists["NK_ALIGN"] > 1 and a.kpm is None
        rows_q, rows_k, n_prog_b, Hq, Hkv = c.rows_q, c.rows_k, c.n_prog_b, c.Hq, c.Hkv
        self.grid_fwd = lambda meta: (triton.cdiv(rows_q, meta["BLOCK_M"]), Hq, n_prog_b)
        self.grid_kv = lambda meta: (triton.cdiv(rows_k, meta["BLOCK_N"]), Hkv, n_prog_b)
        self.common, self.rows, self.cols = c.common, c.rows_lists, c.cols_lists
        self.qkv = {**_strides("sq", q), **_strides("sk", a.k), **_strides("sv", a.v),
                    "slb": c.Hq * c.Nq, "slh": c.Nq, "sln": 1, "H": c.Hq}
        self.has_sinks = a.sinks is not None
        self.block_dv = c.common["BLOCK_DV"]
        self.batch = q.shape[0]
        # The kernels' keyword arguments, completed at the first forward / backward from the
        # outputs' strides (empty_like keeps the inputs' layouts, which the signature fixes);
        # deriving them up front with meta tensors cost ~40 us a plan, measured.
        self.fwd = self.bwd = None

    def _fwd_args(self, o: torch.Tensor) -> dict:
        fwd = {**self.common, **self.rows, **self.qkv, **_strides("so", o),
               "HAS_SINKS": self.has_sinks}
        if self.negate_q:
            fwd["sm_scale"] = -self.scale  # the backward keeps q and the signed scale
        return fwd

    def _bwd_args(self, dq, dk, dv) -> tuple:
        """The preprocess', all backward kernels', the dK/dV pass' and the dQ kernel's
        arguments that every call of the signature shares."""
        pre_block = 16 if INTERPRET else 64
        pre = {"H": self.Hq, "N": self.Nq, "HEAD_DIM": self.dv,
               "BLOCK_D": self.block_dv, "BLOCK_M": pre_block}
        shared = {**self.common, **self.qkv}
        kv = {**self.cols, **_strides("sdk", dk), **_strides("sdv", dv), "HKV": self.Hkv}
        dq_args = {**self.rows, **_strides("sdq", dq)}
        grid_pre = (triton.cdiv(self.Nq, pre_block), self.Hq, self.batch)
        return pre, grid_pre, shared, kv, dq_args

    def valid(self) -> bool:
        """False when something the plan baked in changed since it was built: the interpreter
        switch (tests flip it) or a block list written in place."""
        return self.interpret is INTERPRET and (
            not self.sparse or self.lists_src._version == self.lists_version)

    def forward(self, q, k, v, sinks=None, kpm=None, kv_lo=None, kv_hi=None, alibi=None,
                cu_q=None, cu_k=None):
        """``(o [B, Hq, Nq, Dv], lse [B, Hq, Nq] fp32)`` for one call of the plan's signature
        (``kv_lo``/``kv_hi``: the key mask's span, :func:`_kv_span`)."""
        if self.varlen:
            o = _alloc(q, shape=self.o_shape, tail=(cu_q, 0.0))
            lse = _alloc(q, shape=self.lse_shape, dtype=torch.float32, tail=(cu_q, float("-inf")))
        else:  # _alloc, inlined (the hot path)
            o = torch.empty_like(q) if self.o_shape is None else \
                torch.empty(self.o_shape, device=self.device, dtype=self.dtype)
            lse = torch.empty(self.lse_shape, device=self.device, dtype=torch.float32)
            if POISON_OUTPUTS:
                o.fill_(float("nan"))
                lse.fill_(float("nan"))
        if self.negate_q:
            q = -q
        use_tma = self.tma_walk and not INTERPRET and tma_ok(k, v)
        if use_tma:
            ensure_allocator()
        kw = self.fwd
        if kw is None:
            kw = self.fwd = self._fwd_args(o)
        # .run(grid=...) is what kernel[grid](...) calls, less one copy of the ~70 keywords
        _fwd.run(grid=self.grid_fwd, warmup=False, Q=q, K=k, V=v, O=o, LSE=lse, SINKS=sinks,
                 KPM=None if kpm is None else kpm.view(torch.uint8), KV_LO=kv_lo, KV_HI=kv_hi,
                 ALIBI=alibi, CU_Q=cu_q, CU_K=cu_k, USE_TMA=use_tma,
                 PRECISION=_precision(self.dtype), **kw)
        return o, lse

    def backward(self, do, o, lse, dlse, q, k, v, sinks=None, kpm=None, kv_lo=None, kv_hi=None,
                 alibi=None, cu_q=None, cu_k=None):
        """``(dq, dk, dv, dsinks)``. dQ is accumulated inside the dK/dV pass with fp32 atomics
        (5 matmuls per block pair), or, when :func:`~.bwd_fused.deterministic_backward` says so
        (``torch.use_deterministic_algorithms(True)`` or ``ATTNKIT_DETERMINISTIC=1``), by the
        separate dQ kernel (7 matmuls, bitwise reproducible; block-sparse calls always)."""
        varlen = self.varlen
        delta = _alloc(q, shape=self.lse_shape, dtype=torch.float32)
        # block-sparse: the fused kernel's nested list walk spills (bwd_fused.py), so the split pair
        fused = not deterministic_backward() and not self.sparse
        # packed rows past the last sequence: 0 (the fused accumulator starts at 0 everywhere)
        dq = _alloc(q, tail=(cu_q, 0.0) if varlen and not fused else None)
        dk = _alloc(k, tail=(cu_k, 0.0) if varlen else None)
        dv = _alloc(v, tail=(cu_k, 0.0) if varlen else None)
        if self.bwd is None:
            self.bwd = self._bwd_args(dq, dk, dv)
        pre, grid_pre, shared, kv, dq_args = self.bwd
        dg = _strides("sg", dlse) if dlse is not None else _NO_DLSE
        sd = _strides("sd", do)
        # o and lse are the forward's (their strides are read anyway: the custom op's backward
        # receives them from the graph)
        _bwd_preprocess[grid_pre](O=o, DO=do, DLSE=dlse, DELTA=delta, HAS_DLSE=dlse is not None,
                                  **_strides("so", o), **sd, **dg, **pre)
        shared = {**shared, "Q": q, "K": k, "V": v, "DO": do, "LSE": lse, "DELTA": delta,
                  "KPM": None if kpm is None else kpm.view(torch.uint8), "ALIBI": alibi,
                  "CU_Q": cu_q, "CU_K": cu_k, "PRECISION": _precision(q.dtype), **sd,
                  **_strides("sl", lse)}
        kv_args = {**shared, **kv, "DK": dk, "DV": dv}
        if fused:
            # contiguous rows, and BLOCK_M (<= 128) rows of padding that a query tile hanging past
            # the last row may add its zeros to (the kernel leaves the atomics' rows unmasked)
            dq_acc = torch.zeros((self.batch, self.Hq, self.Nq + 128, self.D), device=q.device,
                                 dtype=torch.float32)
            _dkdv_fused.run(grid=self.grid_kv, warmup=False, DQ=dq_acc, sdqb=dq_acc.stride(0),
                            sdqh=dq_acc.stride(1), FUSE_DQ=True, **kv_args)
            torch.mul(dq_acc[:, :, :self.Nq], self.scale, out=dq)  # the scale and the cast in one
        else:
            _dkdv_split.run(grid=self.grid_kv, warmup=False, DQ=None, sdqb=0, sdqh=0,
                            FUSE_DQ=False, **kv_args)
            _dq.run(grid=self.grid_fwd, warmup=False, DQ=dq, KV_LO=kv_lo, KV_HI=kv_hi, **shared,
                    **dq_args)
        if sinks is None:
            return dq, dk, dv, q.new_empty(0, dtype=torch.float32)
        # d sink_h = -sum_{b, i} p_sink * delta with p_sink = exp(sink - lse): the sink's
        # probability in each row (rows that saw nothing but the sink have lse = sink, p_sink = 1).
        p_sink = torch.exp(sinks.float()[None, :, None] - lse)  # [B, Hq, Nq]
        return dq, dk, dv, -(p_sink * delta).sum((0, 2))


_NO_DLSE = {"sgb": 0, "sgh": 0, "sgn": 0}


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _fwd_impl(a: FlashArgs):
    """One forward from a :class:`FlashArgs` (the custom op's launcher, and every call without a
    cached plan): a plan built for the call and used once."""
    c = _Launch(a)  # its key span: from_call's, or computed for a FlashArgs built by hand
    return FlashPlan(a, c).forward(a.q, a.k, a.v, a.sinks, a.kpm, c.kv_lo, c.kv_hi, a.alibi,
                                   a.cu_q, a.cu_k)


def _bwd_impl(do, o, lse, dlse, a: FlashArgs):
    """``(dq, dk, dv, dsinks)`` of one call (:meth:`FlashPlan.backward`)."""
    c = _Launch(a)
    return FlashPlan(a, c).backward(do, o, lse, dlse, a.q, a.k, a.v, a.sinks, a.kpm, c.kv_lo,
                                    c.kv_hi, a.alibi, a.cu_q, a.cu_k)
