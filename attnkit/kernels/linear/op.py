"""Chunked linear attention in Triton: the launchers and the ``torch.library`` ops.

Definition (``phi`` = the feature map; ``fq = phi(q * scale)``, ``fk = phi(k)``, both ``[N, F]``)::

    S_i = S0 + sum_{j <= i} fk_j v_j^T      [F, Dv]     (non-causal: the sum runs over all j)
    z_i = z0 + sum_{j <= i} fk_j            [F]
    o_i = fq_i S_i / (fq_i . z_i + eps)      (normalize=False: o_i = fq_i S_i)

``HAS_DECAY`` (causal; ``LG = log gamma [HKV]``): ``S_i = gamma S_{i-1} + fk_i v_i^T``.

The chunk form, parallel over the sequence as well as the heads (chunk ``BT``: 64 on a GPU, 16
under the interpreter; ``NT = cdiv(N, BT)`` chunks):

* forward: ``chunk_state._chunk_state_kernel`` computes every chunk's local state
  ``sum_j gamma^(n-1-j) fk_j v_j^T`` (and normaliser) at once; ``chunk_state._state_scan_kernel``
  turns them, in place, into the state entering each chunk (sequential over chunks, but only a
  multiply-add per number, parallel over small flat blocks of each head's state) and writes the
  final state; ``chunk_out._chunk_out_kernel`` computes every chunk's output: the masked
  quadratic term inside the chunk plus ``fq`` times the incoming state. Non-causal: the scan only
  sums, and every chunk reads the total.
* backward: the forward states are recomputed the same way; ``chunk_grad._bwd_prep_kernel``
  computes ``c = -(do . o) / (den + eps)``; ``chunk_grad._chunk_dq_kernel`` computes dq; the same
  state kernel (``BACKWARD``) and a reverse scan give the gradient on each chunk's outgoing state
  (into the same buffer); ``_chunk_dk_kernel`` and ``_chunk_dv_kernel`` give dk and dv, each
  block complete in one program (no fp32 partial planes). GQA: the state kernels and dk/dv loop
  over the query heads of a group, so K/V are never expanded and nothing is reduced afterwards.

Memory: the per-chunk states, ``B * HKV * NT * (F * Dv + F)`` fp32 (at D = 128 and chunk 64,
1 KiB per token and key/value head: four times a bf16 ``[N, 128]`` tensor), live during one
forward or backward call; nothing but ``den [B, HQ, N]`` fp32 is saved for backward besides
q, k, v, o.

Packed sequences (``cu_seqlens [S + 1]`` int32, flash-attention's varlen layout: ``B = 1``, the
sequences concatenated along N): every kernel's ``VARLEN`` variant puts the ``S`` sequences on
the grid's batch axis; a program loads its sequence's first token and length from ``CU``, moves
its base pointers there and masks by that length (``N``, the packed length, stays the row stride
of ``den``/``c``); a chunk past its sequence's end exits at once, and the scan walks only the
sequence's own chunks, so the slots past it are neither written nor read. The chunk-state
buffers are ``[S * HKV, cdiv(max_seqlen, BT), ...]``; the initial and final states ``[S, HKV,
...]``. The packed tensors are read in place (no padded copy).

Built-in feature maps are fused (``FEATURE``, the codes of ``feature_maps.FEATURES``). Numerics:
states, denominators and all accumulators are fp32; intra-chunk products and the local states take
fp16/bf16 operands for 16-bit inputs (tensor cores) with fp32 accumulation; products with a
stored state take fp32 operands (TF32 unless ``torch.get_float32_matmul_precision() ==
"highest"``), so the state is never rounded to 16 bits. Base offsets are int64.

This module allocates every output (hence ``POISON_OUTPUTS`` here). An absent initial state, or
an absent gradient on the final state, is passed as ``None`` and its ``HAS_*`` flag derived from
that.
"""

from __future__ import annotations

import torch
import triton

from . import tiles
from .chunk_grad import _bwd_prep_kernel, _chunk_dk_kernel, _chunk_dq_kernel, _chunk_dv_kernel
from .chunk_out import _chunk_out_kernel
from .chunk_state import _chunk_state_kernel, _state_scan_kernel
from .feature_maps import FEATURES
from .tiles import INTERPRET, MAX_DIM, pow2
from .tiles import dense_state as _dense
from .tiles import launch_flags as _flags
from .tiles import launch_sizes as _sizes
from .tiles import launch_strides as _strides

__all__ = ["linear_attention_triton", "FEATURES", "INTERPRET", "MAX_DIM"]

#: Tests set this to fill every output with NaN before the kernels run (unwritten -> fails).
POISON_OUTPUTS = False

# (kernel, meta): on a GPU the autotuned kernel, whose configs set BK/BV/BT (meta None); under
# the interpreter the kernel and the blocks the launcher passes (tiles.autotuned)
_KERNELS = {
    "state": tiles.autotuned(_chunk_state_kernel, "state"),
    "out": tiles.autotuned(_chunk_out_kernel, "out"),
    "dq": tiles.autotuned(_chunk_dq_kernel, "dq"),
    "dk": tiles.autotuned(_chunk_dk_kernel, "dk"),
    "dv": tiles.autotuned(_chunk_dv_kernel, "dv"),
}


def _launch(which: str, shape: tuple, **args) -> None:
    """Launch kernel ``which`` on grid ``(split blocks * chunks, heads, B)``: axis 0 packs the
    split dim's blocks (``BK`` for dq/dk, ``BV`` for out/dv, both for state) with the chunks."""
    F, Dv, nt, heads, B = shape  # (F, Dv, chunks, heads on the grid, batch rows)
    kernel, meta = _KERNELS[which]

    def grid(m):
        n_k, n_v = triton.cdiv(F, m["BK"]), triton.cdiv(Dv, m["BV"])
        return ({"state": n_k * n_v, "dq": n_k, "dk": n_k}.get(which, n_v) * nt, heads, B)

    kernel[grid](**args, **(meta(which, F, Dv) if meta else {}))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An output buffer (NaN-filled when the tests poison outputs)."""
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def _chunk_states(x, y, den, c, hs, hz, lg, group, backward, common):
    """Every chunk's local state into ``hs [B*HKV, NT, F, Dv]`` / ``hz [B*HKV, NT, F]``: from
    ``x = k``, ``y = v`` (forward) or ``x = q``, ``y = do`` with ``den``/``c`` (backward).
    Packed (``common["CU"]``): ``B`` is the number of sequences."""
    _, _, N, F = x.shape
    B = _rows(x, common["CU"])
    nt, Dv, Hkv = hs.shape[1], y.shape[3], hs.shape[0] // B
    _launch(
        "state", (F, Dv, nt, Hkv, B), X=x, Y=y, DEN=den, C=c, HS=hs, HZ=hz, LG=lg,
        CU=common["CU"], **_strides("sx", x), **_strides("sy", y),
        scale=common["scale"] if backward else 1.0, eps=common["eps"], HX=x.shape[1], HKV=Hkv,
        GROUP=group, N=N, F=F, DV=Dv, NT=nt, FEATURE=common["FEATURE"], BACKWARD=backward,
        NORMALIZE=common["NORMALIZE"], HAS_DECAY=lg is not None, PRECISION=common["PRECISION"],
        UPCAST=common["UPCAST"], VARLEN=common["VARLEN"],
    )


def _scan(hs, hz, s_in, z_in, s_out, z_out, lg, N, bt, reverse, store, cu):
    """The scan of the chunk slots (``chunk_state._state_scan_kernel``), in place."""
    BH, nt, F, Dv = hs.shape
    B, Hkv = s_out.shape[0], s_out.shape[1]
    block, chunks = tiles.scan_block()
    _state_scan_kernel[(triton.cdiv(F * Dv + F, block), Hkv, B)](
        HS=hs, HZ=hz, S_IN=s_in, Z_IN=z_in, S_OUT=s_out, Z_OUT=z_out, LG=lg, CU=cu, HKV=Hkv,
        N=N, NT=nt, F=F, DV=Dv, HAS_IN=s_in is not None, REVERSE=reverse,
        HAS_DECAY=lg is not None, STORE=store, VARLEN=cu is not None, BT=bt, BC=chunks,
        BLOCK=block, num_warps=4,
    )


def _state_args(causal, hs, hz, total_s, total_z) -> dict:
    """Where the output/gradient kernels read a chunk's state: its slot (causal) or, for every
    chunk, the whole sequence's (non-causal: chunk stride 0)."""
    if causal:
        nt, F, Dv = hs.shape[1:]
        return dict(HS=hs, HZ=hz, hs_head=nt * F * Dv, hs_chunk=F * Dv, hz_head=nt * F,
                    hz_chunk=F)
    F, Dv = total_s.shape[2:]
    return dict(HS=total_s, HZ=total_z, hs_head=F * Dv, hs_chunk=0, hz_head=F, hz_chunk=0)


def _rows(q, cu) -> int:
    """The state rows (and the grid's batch axis): q's batch, or the packed sequences."""
    return q.shape[0] if cu is None else cu.shape[0] - 1


def _chunks(q, cu, max_seqlen: int, bt: int) -> int:
    """Chunk slots per head: of the sequence, or (packed) of the longest one."""
    return triton.cdiv(q.shape[2] if cu is None else max_seqlen, bt)


def _common(q, feature, causal, normalize, eps, scale, cu) -> dict:
    """The scalars and flags every kernel of a call takes (``CU``/``VARLEN``: the packing)."""
    return dict(scale=float(scale), eps=float(eps), **_flags(q, feature, causal, normalize),
                CU=cu, VARLEN=cu is not None)


def _forward_states(q, k, v, s0, z0, lg, bt, common, causal, nt):
    """``(hs, hz, s_N, z_N)``: the state entering each chunk (causal) and the final one."""
    _, Hq, N, F = q.shape
    B = _rows(q, common["CU"])
    Hkv, Dv = k.shape[1], v.shape[3]
    hs = _empty((B * Hkv, nt, F, Dv), q, torch.float32)
    hz = _empty((B * Hkv, nt, F), q, torch.float32)
    st = _empty((B, Hkv, F, Dv), q, torch.float32)
    zt = _empty((B, Hkv, F), q, torch.float32)
    _chunk_states(k, v, None, None, hs, hz, lg, 1, False, common)
    _scan(hs, hz, s0, z0, st, zt, lg, N, bt, reverse=False, store=causal, cu=common["CU"])
    return hs, hz, st, zt


def _fwd_impl(q, k, v, s0, z0, feature, causal, normalize, eps, scale, lg=None, cu=None,
              max_seqlen=0):
    _, Hq, N, F = q.shape
    B = _rows(q, cu)
    Dv = v.shape[3]
    bt = tiles.chunk()
    nt = _chunks(q, cu, max_seqlen, bt)
    common = _common(q, feature, causal, normalize, eps, scale, cu)
    s0, z0 = _dense(s0, z0)
    hs, hz, st, zt = _forward_states(q, k, v, s0, z0, lg, bt, common, causal, nt)
    o = _empty((q.shape[0], Hq, N, Dv), q)
    # without normalisation there is no denominator, but backward still takes the saved tensor
    den = (_empty((q.shape[0], Hq, N), q, torch.float32) if normalize
           else q.new_zeros((q.shape[0], Hq, N), dtype=torch.float32))
    _launch(
        "out", (F, Dv, nt, Hq, B), Q=q, K=k, V=v, OUT=o, DEN=den, LG=lg,
        **_state_args(causal, hs, hz, st, zt),
        **_strides("sq", q), **_strides("sk", k), **_strides("sv", v), **_strides("so", o),
        **_sizes(q, k, v), NT=hs.shape[1], HAS_DECAY=lg is not None, **common,
    )
    return o, den, st, zt


def _bwd_impl(do, q, k, v, o, den, s0, z0, dst, dzt, feature, causal, normalize, eps, scale,
              lg=None, cu=None, max_seqlen=0, dden=None):
    _, Hq, N, F = q.shape
    B = _rows(q, cu)
    Hkv, Dv = k.shape[1], v.shape[3]
    bt = tiles.chunk()
    nt = _chunks(q, cu, max_seqlen, bt)
    common = _common(q, feature, causal, normalize, eps, scale, cu)
    do = do if do.stride(-1) == 1 else do.contiguous()
    s0, z0 = _dense(s0, z0)
    hs, hz, st, zt = _forward_states(q, k, v, s0, z0, lg, bt, common, causal, nt)
    sizes = dict(**_sizes(q, k, v), NT=nt, HAS_DECAY=lg is not None, LG=lg, **common)
    qkv = dict(Q=q, K=k, **_strides("sq", q), **_strides("sk", k), **_strides("sdo", do))
    c = den  # read only when normalising
    if normalize:
        c = _empty(den.shape, q, torch.float32)
        if dden is not None:
            dden = dden.to(torch.float32).contiguous()
        _bwd_prep_kernel[(nt, Hq, B)](
            DO=do, OUT=o, DEN=den, DDEN=dden, C=c, CU=cu, **_strides("sdo", do),
            **_strides("so", o), eps=float(eps), HQ=Hq, N=N, DV=Dv, VARLEN=cu is not None,
            HAS_DDEN=dden is not None, BT=bt, BV=pow2(Dv), num_warps=4,
        )
    dq = _empty(q.shape, q)
    _launch(
        "dq", (F, Dv, nt, Hq, B), V=v, DO=do, DEN=den, C=c, DQ=dq, **qkv, **_strides("sv", v),
        **_strides("sdq", dq),
        **_state_args(causal, hs, hz, st, zt), **sizes,
    )
    # the gradients on the state leaving each chunk, into the same buffers (dq has read them)
    _chunk_states(q, do, den, c, hs, hz, lg, Hq // Hkv, True, common)
    ds0 = _empty((B, Hkv, F, Dv), q, torch.float32)
    dz0 = _empty((B, Hkv, F), q, torch.float32)
    if dst is not None or dzt is not None:  # one of the two unused: its gradient is zero
        dst = dst.contiguous() if dst is not None else q.new_zeros((B, Hkv, F, Dv),
                                                                  dtype=torch.float32)
        dzt = dzt.contiguous() if dzt is not None else q.new_zeros((B, Hkv, F),
                                                                  dtype=torch.float32)
    _scan(hs, hz, dst, dzt, ds0, dz0, lg, N, bt, reverse=True, store=causal, cu=cu)
    grads = _state_args(causal, hs, hz, ds0, dz0)
    dk = _empty(k.shape, k)
    _launch(
        "dk", (F, Dv, nt, Hkv, B), V=v, DO=do, DEN=den, C=c, DK=dk, **qkv, **_strides("sv", v),
        **_strides("sdk", dk),
        **grads, **sizes,
    )
    dv = _empty(v.shape, v)
    _launch(
        "dv", (F, Dv, nt, Hkv, B), DO=do, DEN=den, DV_=dv, **qkv, **_strides("sdv", dv), **grads,
        **sizes,
    )
    if s0 is None:  # two tensors: outputs of a custom op must not alias each other
        ds0, dz0 = (q.new_empty((0,), dtype=torch.float32) for _ in range(2))
    return dq, dk, dv, ds0, dz0


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnkit::linear_attn_fwd", mutates_args=())
def linear_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s0: torch.Tensor | None,
    z0: torch.Tensor | None, feature: int, causal: bool, normalize: bool, eps: float, scale: float,
    lg: torch.Tensor | None = None, cu: torch.Tensor | None = None, max_seqlen: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention forward: ``(o [B, Hq, N, Dv], den [B, Hq, N] fp32, s [R, Hkv, F, Dv] fp32,
    z [R, Hkv, F] fp32)``; ``den`` is saved for backward (zeros when ``normalize`` is False).
    ``lg``: ``log gamma [Hkv]`` fp32 of a decaying state (causal only), or None. ``cu``: int32
    ``cu_seqlens [S + 1]`` of ``S`` sequences packed along N (``B = 1``), the longest
    ``max_seqlen`` tokens, or None; the state rows ``R`` are ``B``, or ``S`` when packed."""
    return _fwd_impl(q, k, v, s0, z0, feature, causal, normalize, eps, scale, lg, cu, max_seqlen)


@linear_attn_fwd.register_fake
def _(q, k, v, s0, z0, feature, causal, normalize, eps, scale, lg=None, cu=None, max_seqlen=0):
    B, Hq, N, F = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    rows = _rows(q, cu)
    return (
        q.new_empty((B, Hq, N, Dv)), q.new_empty((B, Hq, N), dtype=torch.float32),
        q.new_empty((rows, Hkv, F, Dv), dtype=torch.float32),
        q.new_empty((rows, Hkv, F), dtype=torch.float32),
    )


@torch.library.custom_op("attnkit::linear_attn_bwd", mutates_args=())
def linear_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    den: torch.Tensor, s0: torch.Tensor | None, z0: torch.Tensor | None,
    dst: torch.Tensor | None, dzt: torch.Tensor | None, feature: int, causal: bool,
    normalize: bool, eps: float, scale: float, lg: torch.Tensor | None = None,
    cu: torch.Tensor | None = None, max_seqlen: int = 0, dden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention backward: ``(dq, dk, dv, ds0, dz0)``; ``ds0``/``dz0`` are empty when
    there is no initial state. ``dst``/``dzt`` are the gradients on the returned final state,
    ``dden`` the gradient on the returned denominator (normalised calls; None: none)."""
    return _bwd_impl(do, q, k, v, o, den, s0, z0, dst, dzt, feature, causal, normalize, eps, scale,
                     lg, cu, max_seqlen, dden)


@linear_attn_bwd.register_fake
def _(do, q, k, v, o, den, s0, z0, dst, dzt, feature, causal, normalize, eps, scale, lg=None,
      cu=None, max_seqlen=0, dden=None):
    if s0 is None:
        ds0, dz0 = (q.new_empty((0,), dtype=torch.float32) for _ in range(2))
    else:
        ds0, dz0 = torch.empty_like(s0), torch.empty_like(z0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds0, dz0


_NON_TENSOR_ARGS = ("feature", "causal", "normalize", "eps", "scale")
#: The op's trailing optional inputs, with their defaults: decay, then the packing.
_OPTIONAL_ARGS = {"lg": None, "cu": None, "max_seqlen": 0}


def _setup_context(ctx, inputs, output):
    q, k, v, s0, z0, *rest = inputs
    n = len(_NON_TENSOR_ARGS)
    lg, cu, max_seqlen = (rest[n + i] if len(rest) > n + i else default
                          for i, default in enumerate(_OPTIONAL_ARGS.values()))
    o, den, _, _ = output
    ctx.save_for_backward(q, k, v, o, den, s0, z0, lg, cu)
    ctx.args = dict(zip(_NON_TENSOR_ARGS, rest[:n], strict=True))
    ctx.max_seqlen = max_seqlen
    ctx.n_inputs = len(inputs)
    ctx.set_materialize_grads(False)  # unused state outputs then cost nothing in backward


def _backward(ctx, do, dden, dst, dzt):
    q, k, v, o, den, s0, z0, lg, cu = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    if not ctx.args["normalize"]:
        dden = None  # den is zeros there: nothing depends on it
    dq, dk, dv, ds0, dz0 = torch.ops.attnkit.linear_attn_bwd(
        do, q, k, v, o, den, s0, z0, dst, dzt, *ctx.args.values(), lg, cu, ctx.max_seqlen, dden
    )
    if s0 is None:
        ds0 = dz0 = None
    # no gradient for the flags, nor for the decay (gamma is a fixed rate) or the packing
    return (dq, dk, dv, ds0, dz0) + (None,) * (ctx.n_inputs - 5)


linear_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_packing(fq, fk, s0, cu_seqlens, max_seqlen):
    """``(cu int32 [S + 1] contiguous on fq's device, max_seqlen)`` for a packed call. No
    device sync when ``max_seqlen`` is given: the lengths themselves are the caller's to check
    (``attnkit.attn.linear_checks.check_cu_seqlens`` does it on the host)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32/int64 torch.Tensor [S + 1] or None, got "
                        f"{type(cu_seqlens).__name__}")
    if (cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1
            or cu_seqlens.numel() < 2):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [S + 1] with S >= 1, got "
                         f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}")
    if fq.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs the sequences along N of B = 1 tensors; fq has "
                         f"B = {fq.shape[0]} (flatten the batch to [1, H, total, D])")
    rows = cu_seqlens.numel() - 1
    if s0 is not None and s0.shape[0] != rows:
        raise ValueError(f"s0 must have one row per packed sequence ([S, Hkv, F, Dv] with "
                         f"S = {rows}), got {list(s0.shape)}")
    cu = cu_seqlens.to(device=fq.device, dtype=torch.int32).contiguous()
    if max_seqlen is None:  # one device-to-host copy
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if fq.shape[2] else 0
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or not (
            0 <= max_seqlen <= fq.shape[2]):
        raise ValueError(f"max_seqlen must be an int in [0, N = {fq.shape[2]}] (the longest "
                         f"packed sequence), got {max_seqlen!r}")
    return cu, max_seqlen


def linear_attention_triton(fq, fk, v, s0, z0, feature: str, causal: bool, normalize: bool,
                            eps: float, scale: float, decay: torch.Tensor | None = None,
                            cu_seqlens: torch.Tensor | None = None,
                            max_seqlen: int | None = None, return_den: bool = False):
    """Run the Triton op. ``fq [B, Hq, N, F]``, ``fk [B, Hkv, N, F]``, ``v [B, Hkv, N, Dv]``:
    raw q/k when ``feature`` is a fused map, already mapped features when it is ``"identity"``;
    ``s0 [B, Hkv, F, Dv]`` / ``z0 [B, Hkv, F]`` fp32 or both None; ``decay`` ``[Hkv]`` gamma
    in (0, 1] (causal only) or None. Returns ``(o [B, Hq, N, Dv], s [B, Hkv, F, Dv],
    z [B, Hkv, F])``, the states fp32.

    Packed sequences: ``cu_seqlens`` int ``[S + 1]`` (flash-attention's varlen layout: ``B = 1``,
    sequence ``i`` is tokens ``cu_seqlens[i]:cu_seqlens[i + 1]`` of N; it must start at 0, not
    decrease and end at N) and ``max_seqlen`` (the longest sequence, at least; ``None``: read
    from ``cu_seqlens``, one device sync). Every sequence runs on its own from its own initial
    state: ``s0 [S, Hkv, F, Dv]`` / ``z0 [S, Hkv, F]``, and ``s``/``z`` come back ``[S, ...]``
    (an empty sequence returns its initial state, or zeros). The kernels read the packed
    tensors in place: no padded copy.

    ``return_den=True`` (normalised calls) returns ``(o, den, s, z)`` with ``den [B, Hq, N]``
    fp32 = ``fq_i . z_i`` (without ``eps``), differentiable: the hybrid merges the numerator
    ``o (den + eps)`` and ``den`` with its window part."""
    lg = None if decay is None else torch.log(decay.to(device=fq.device, dtype=torch.float32))
    cu, longest = None, 0
    if cu_seqlens is not None:
        cu, longest = _check_packing(fq, fk, s0, cu_seqlens, max_seqlen)
    o, den, s, z = torch.ops.attnkit.linear_attn_fwd(
        fq, fk, v, s0, z0, FEATURES[feature], bool(causal), bool(normalize), float(eps),
        float(scale), None if lg is None else lg.contiguous(), cu, longest,
    )
    return (o, den, s, z) if return_den else (o, s, z)
