"""Linear attention: :func:`linear_attention` (parallel form) and :func:`linear_attention_step`.

Both compute the same recurrence, one over a whole sequence (chunked Triton kernels on CUDA, chunked
PyTorch on the CPU), the other one token at a time for decoding, and both carry the same
:class:`LinearAttentionState`, so a sequence can be prefilled in pieces and then decoded.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..kernels.dispatch import TRITON_DTYPES
from ..kernels.linear.backends import LinearAttentionCall, run_linear_attention
from ..kernels.linear.torch_impl import compute_dtype
from .feature_maps import resolve_feature_map
from .linear_checks import check_cu_seqlens, check_window, split_hybrid_state

__all__ = [
    "LinearAttentionState", "HybridAttentionState", "linear_attention", "linear_attention_step",
]

_DTYPES = (*TRITON_DTYPES, torch.float64)


class LinearAttentionState(NamedTuple):
    """The recurrent state after a prefix of the sequence, one per key/value head.

    ``s [B, Hkv, F, Dv]``: ``S0 + sum_j phi(k_j) v_j^T``; ``z [B, Hkv, F]``: ``z0 + sum_j phi(k_j)``
    (``F`` = features after the map). float32 (float64 when the inputs are float64 on the torch
    backend). The state depends only on keys and values, so with GQA all query heads of a group
    share it. A plain ``(s, z)`` tuple is accepted wherever a state is.
    """

    s: torch.Tensor
    z: torch.Tensor


class HybridAttentionState(NamedTuple):
    """The state of the sliding-window + linear hybrid (``linear_attention(..., window=W)``)
    after a prefix of ``T`` tokens.

    ``s [B, Hkv, F, Dv]``, ``z [B, Hkv, F]``: the linear state of the keys that have left the
    window (tokens ``<= T - W``), decayed to token ``T - 1`` (key ``j`` weighted by
    ``gamma^(T - 1 - j)``); float32 (float64 for float64 inputs). ``k [B, Hkv, L, Dk]``,
    ``v [B, Hkv, L, Dv]``: the raw keys and values of the last ``L = min(W - 1, T)`` tokens, in
    q's dtype: the next query's window is these plus its own key. Its size does not depend on
    ``T``. A plain ``(s, z, k, v)`` tuple is accepted wherever a state is.
    """

    s: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _tensor(name: str, t: object, dims: tuple[int, ...], layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; float16, bfloat16, float32 or float64 are accepted"
        )
    return t


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _real(name: str, value: object, *, min_value: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value!r}")
    return float(value)


def _check_qkv(q, k, v, seq: bool):
    """Shapes, dtypes and devices of q/k/v: ``[B, H, N, D]`` (``seq``) or ``[B, H, D]``."""
    layout = "[B, H{}, N, {}]" if seq else "[B, H{}, {}] (or [B, H{}, 1, {}])"
    q = _tensor("q", q, (4,) if seq else (3, 4), layout.format("q", "Dk", "q", "Dk"))
    k = _tensor("k", k, (q.dim(),), layout.format("kv", "Dk", "kv", "Dk"))
    v = _tensor("v", v, (q.dim(),), layout.format("kv", "Dv", "kv", "Dv"))
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; use one device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; use one dtype")
    if not seq and q.dim() == 4:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[2] != 1:
                raise ValueError(
                    f"{name} must hold one token ([B, H, 1, D] or [B, H, D]) for the decode "
                    f"step, got shape {tuple(t.shape)}; use linear_attention for sequences"
                )
    B, Hq = q.shape[:2]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}; they must be equal"
        )
    Hkv = k.shape[1]
    if v.shape[1] != Hkv:
        raise ValueError(f"k has {Hkv} heads but v has {v.shape[1]}; they must be equal")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(
            f"q has {Hq} heads and k/v have {Hkv}; the query heads must be a multiple of the "
            "key/value heads (GQA/MQA)"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k has head dim {k.shape[-1]} but q has {q.shape[-1]}; q and k must share Dk"
        )
    if seq and not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(
            f"sequence lengths differ: q has N = {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]}; "
            "linear attention needs one N for q, k and v (process a prefix with return_state "
            "and pass it as initial_state instead)"
        )
    return q, k, v


def _check_decay(decay: object, Hq: int, Hkv: int, device) -> torch.Tensor | None:
    """``decay`` as a float64 ``[Hkv]`` tensor on ``device``, or ``None`` when there is none
    (``None`` or ``1.0``). The state is per key/value head, so gamma is too."""
    if decay is None:
        return None
    if isinstance(decay, torch.Tensor):
        if decay.requires_grad:
            raise ValueError("decay takes no gradient (it is a fixed per-head rate); pass "
                             "decay.detach()")
        if decay.is_complex() or not decay.is_floating_point():
            raise TypeError(f"decay must be a float or a floating-point tensor, got {decay.dtype}")
        if decay.dim() > 1 or (decay.dim() == 1 and decay.shape[0] not in (1, Hkv)):
            per_q = decay.dim() == 1 and decay.shape[0] == Hq
            why = (f"; with GQA the state is shared by the {Hq // Hkv} query heads of a group, so "
                   "gamma is per key/value head" if per_q else "")
            raise ValueError(f"decay must be a float or a tensor of shape [Hkv] = [{Hkv}] (one "
                             f"gamma per key/value head), got shape {list(decay.shape)}{why}")
        g = decay.detach().to(dtype=torch.float64).reshape(-1)
    else:
        if float(_real("decay", decay)) == 1.0:
            return None
        g = torch.tensor([float(decay)], dtype=torch.float64)
    # checked where gamma lives (a CPU tensor or a float: no device sync; a CUDA tensor: one)
    if bool((~((g > 0) & (g <= 1))).any()):  # a gamma outside (0, 1] would blow the state up
        got = decay.tolist() if isinstance(decay, torch.Tensor) else decay
        raise ValueError(f"decay must lie in (0, 1] (one gamma per key/value head), got {got!r}")
    return g.to(device).expand(Hkv).contiguous()


def _apply_map(phi: Callable, name: str, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = phi(x)
    if not isinstance(out, torch.Tensor) or out.shape[:-1] != x.shape[:-1]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"feature_map must map {name} [..., D] to [..., F] keeping the leading dims "
            f"{tuple(x.shape[:-1])}, got {got}"
        )
    return out.to(like.dtype)


def _check_state(state: object, B: int, Hkv: int, F: int, Dv: int, device, arg: str):
    """``(s, z)`` from a :class:`LinearAttentionState` or tuple, in the compute dtype."""
    if not isinstance(state, tuple):
        raise TypeError(
            f"{arg} must be a LinearAttentionState(s, z) or a tuple (s, z), got "
            f"{type(state).__name__}"
        )
    if len(state) != 2:  # a tuple, but not a pair: say so ("got tuple" would contradict itself)
        raise ValueError(
            f"{arg} must hold two tensors (s [B, Hkv, F, Dv], z [B, Hkv, F]), got a tuple of "
            f"{len(state)}"
        )
    s, z = state
    for name, t, shape in (("s", s, (B, Hkv, F, Dv)), ("z", z, (B, Hkv, F))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}.{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{arg}.{name} must have shape {list(shape)} ([B, Hkv, F{', Dv' * (name == 's')}]"
                f" with F = features after the feature map), got {list(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"{arg}.{name} is on {t.device} but q is on {device}")
        if not t.is_floating_point():
            raise TypeError(f"{arg}.{name} must be a floating-point tensor, got {t.dtype}")
    return s, z


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu1",
    causal: bool = True,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float = 1.0,
    initial_state: LinearAttentionState | tuple[torch.Tensor, torch.Tensor] | None = None,
    return_state: bool = False,
    decay: float | torch.Tensor | None = None,
    window: int | None = None,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, LinearAttentionState | HybridAttentionState]:
    """Kernelised (linear) attention in O(N) time and memory.

    With ``phi = feature_map`` applied to ``q * scale`` and to ``k``, and the initial state
    ``(S0, z0)`` (zeros by default)::

        S_i = S0 + sum_{j <= i} phi(k_j) v_j^T        z_i = z0 + sum_{j <= i} phi(k_j)
        o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps)

    ``causal=False`` sums over all ``j`` (every query sees the whole sequence); ``normalize=False``
    drops the denominator (``o_i = phi(q_i) S_i``).

    Args:
        q: ``[B, Hq, N, Dk]``. Any strides (``[B, N, H, D]`` views are read in place by Triton).
        k: ``[B, Hkv, N, Dk]``; v: ``[B, Hkv, N, Dv]`` (``Dv`` may differ from ``Dk``).
            ``Hq % Hkv == 0``: query head ``h`` reads key/value head ``h // (Hq // Hkv)``
            without K/V being expanded in memory. q, k, v share N, dtype and device.
        feature_map: ``"elu1"`` (``elu(x) + 1``), ``"relu"``, ``"identity"`` (fused into the
            Triton kernels), or any callable ``[..., Dk] -> [..., F]`` such as
            :class:`~attnkit.attn.HedgehogFeatureMap` (run outside the kernel under autograd;
            its output is cast to q's dtype). With ``"identity"`` and ``normalize=True`` the
            denominator can reach zero: prefer a positive map then.
        causal: causal (default) or bidirectional.
        normalize: divide by ``phi(q_i) . z_i + eps``.
        eps: ``>= 0``, added to the denominator.
        scale: multiplies q before the feature map (1.0 by default, as in most linear attention
            models).
        initial_state: a :class:`LinearAttentionState` ``(s [B, Hkv, F, Dv], z [B, Hkv, F])``
            from an earlier call or step (``F`` = features after the map, ``Dk`` for the
            built-in maps); it is used in float32 (float64 for float64 inputs on the
            torch backend) and gets gradients if it requires them.
        return_state: also return the state after the last token.
        decay: ``gamma`` in (0, 1]: a float, or a tensor ``[Hkv]`` (one per key/value head: the
            state is per key/value head, so with GQA a group's query heads share their gamma;
            a ``[Hq]`` tensor with ``Hq != Hkv`` is refused). The state then decays per token
            (retention / Lightning attention), causal only::

                S_i = gamma S_{i-1} + phi(k_i) v_i^T        z_i = gamma z_{i-1} + phi(k_i)

            so key ``j`` is weighted by ``gamma^(i - j)`` and ``initial_state`` by
            ``gamma^(i + 1)``. ``gamma`` gets no gradient (a tensor that requires grad is
            refused). Both backends (and the decode step) take it. ``None`` or ``1.0``: none.
        window: ``W`` (an int ``>= 1``) for the sliding-window + linear **hybrid** (causal only,
            ``normalize=True``): query ``i`` attends the keys ``(i - W, i]`` with softmax
            weights and the older keys ``j <= i - W`` with linear weights, under one
            normaliser::

                o_i = (sum_win e^{c q_i.k_j} v_j + sum_lin g_ij phi_i.phi_j v_j)
                      / (sum_win e^{c q_i.k_j} + sum_lin g_ij phi_i.phi_j + eps)

            with ``c = softmax_scale``, ``phi_i = phi(q_i * scale)``, ``phi_j = phi(k_j)`` and
            ``g_ij = gamma^(i - j)`` under ``decay`` (1 without): **decay weights only the
            linear part**, by the distance to the query (a key leaving the window enters the
            linear part with ``gamma^W``); the softmax weights are never decayed. ``W = 1``:
            only the diagonal is softmax. Computed stably (each row is scaled by
            ``exp(-max score)``: no overflow for large scores). The state is then a
            :class:`HybridAttentionState` (linear state of the keys that left the window, plus
            the last ``W - 1`` keys/values); ``initial_state`` takes one (``L <= W - 1``
            window tokens) and ``return_state`` returns one. Both backends: on Triton the
            flash kernel computes the window part and the linear kernel the rest.
        softmax_scale: ``c`` of the hybrid's window scores; defaults to ``Dk ** -0.5``.
        cu_seqlens: int ``[S + 1]`` cumulative lengths of ``S`` sequences packed along N of
            ``B = 1`` tensors (flash-attention's varlen layout, as :func:`attnkit.attention`):
            every sequence runs on its own from its own initial state (``initial_state`` then
            has ``S`` rows: ``s [S, Hkv, F, Dv]``), and ``return_state`` gives ``S`` rows. Read
            on the host (one sync). With ``window`` no state may be passed or returned. Both
            backends (Triton reads the packed tensors in place).
        backend: ``"auto"`` (Triton for CUDA tensors, torch on the CPU), ``"triton"`` (CUDA, or
            the CPU under ``TRITON_INTERPRET=1``; fp16/bf16/fp32, ``F``, ``Dv <= 256``, the hybrid's
            ``Dk <= 256``) or ``"torch"``. ``ATTNKIT_BACKEND`` overrides ``"auto"``.

    Returns:
        ``o [B, Hq, N, Dv]`` in q's dtype, and with ``return_state=True`` also the
        :class:`LinearAttentionState` (with ``window``: :class:`HybridAttentionState`) after
        token ``N``.

    Raises:
        TypeError / ValueError naming the argument, the value and what is accepted.
    """
    q, k, v = _check_qkv(q, k, v, seq=True)
    name, phi = resolve_feature_map(feature_map)
    causal = _flag("causal", causal)
    normalize = _flag("normalize", normalize)
    return_state = _flag("return_state", return_state)
    eps = _real("eps", eps, min_value=0.0)
    scale = _real("scale", scale)
    gamma = _check_decay(decay, q.shape[1], k.shape[1], q.device)
    if gamma is not None and not causal:
        raise ValueError(f"decay={decay!r} needs causal=True: a decaying state is defined along "
                         "the sequence order (use decay=None or 1.0 for bidirectional attention)")
    window = check_window(window, causal, normalize)
    segs = check_cu_seqlens(cu_seqlens, q)
    if segs is not None and window is not None and (initial_state is not None or return_state):
        raise ValueError("cu_seqlens with window: the hybrid keeps no per-sequence state for "
                         "packed sequences; pass initial_state=None and return_state=False (or "
                         "run the sequences as a padded batch)")
    sm_scale = (q.shape[-1] ** -0.5 if softmax_scale is None
                else _real("softmax_scale", softmax_scale))
    win_state = None
    if window is not None and initial_state is not None:
        initial_state, win_state = split_hybrid_state(initial_state, q, k, v, window)
    fkw = None
    if name is None:  # a callable: map outside the kernel, under autograd
        fq, fk = _apply_map(phi, "q", q * scale, q), _apply_map(phi, "k", k, q)
        if fq.shape[-1] != fk.shape[-1]:
            raise ValueError(
                f"feature_map gave {fq.shape[-1]} features for q but {fk.shape[-1]} for k"
            )
        if win_state is not None:
            fkw = _apply_map(phi, "the window keys", win_state[0], q)
        name, kscale = "identity", 1.0
    else:
        fq, fk, kscale = q, k, scale
    B, Hkv, F, Dv = q.shape[0], k.shape[1], fq.shape[-1], v.shape[-1]
    s0 = z0 = None
    if initial_state is not None:
        rows = B if segs is None else len(segs)
        s0, z0 = _check_state(initial_state, rows, Hkv, F, Dv, q.device, "initial_state")
        sdt = compute_dtype(q.dtype)
        # The kernels index the state as a dense [B, Hkv, F, Dv] block: an expanded (broadcast)
        # state must be materialised, or the backward would read past it.
        s0, z0 = s0.to(sdt).contiguous(), z0.to(sdt).contiguous()
    hyb = {}
    if window is not None:
        hyb = dict(window=window, softmax_scale=sm_scale, q_raw=q, k_raw=k, fkw=fkw)
        if win_state is not None:
            hyb.update(kw=win_state[0], vw=win_state[1])
    call = LinearAttentionCall(fq, fk, v, s0, z0, name, causal, normalize, eps, kscale, gamma,
                               segments=segs, **hyb)
    o, s, z, *win = run_linear_attention(call, backend)
    if not return_state:
        return o
    if window is not None:
        return o, HybridAttentionState(s, z, win[0], win[1])
    return o, LinearAttentionState(s, z)


def linear_attention_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    state: LinearAttentionState | tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu1",
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float = 1.0,
    decay: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One decoding step of causal linear attention: the recurrent form of
    :func:`linear_attention`, for token ``t`` given the state after tokens ``< t``::

        S_t = S_{t-1} + phi(k_t) v_t^T,  z_t = z_{t-1} + phi(k_t)
        o_t = phi(q_t * scale) S_t / (phi(q_t * scale) . z_t + eps)

    PyTorch (a handful of ``[F, Dv]`` products; any device, differentiable), except that a
    no-grad CUDA call with a built-in feature map runs attnkit's CUDA kernel for the whole batch
    in one launch when the extension is available (:mod:`attnkit.kernels.linear.cuda`).

    Args:
        q_t: ``[B, Hq, Dk]`` or ``[B, Hq, 1, Dk]``; k_t: ``[B, Hkv, Dk]`` / ``[B, Hkv, 1, Dk]``;
            v_t: ``[B, Hkv, Dv]`` / ``[B, Hkv, 1, Dv]``; ``Hq % Hkv == 0``.
        state: the :class:`LinearAttentionState` ``(s [B, Hkv, F, Dv], z [B, Hkv, F])`` from
            :func:`linear_attention` (``return_state=True``) or the previous step; ``None``
            starts from zeros.
        feature_map, normalize, eps, scale, decay: as :func:`linear_attention` (use the same
            values); with ``decay`` the step is ``S_t = gamma S_{t-1} + phi(k_t) v_t^T``.

    Returns:
        ``(o_t, new_state)``: ``o_t`` ``[B, Hq, Dv]`` (or ``[B, Hq, 1, Dv]``, following q_t) in
        q's dtype; the state in float32 (float64 for float64 inputs).
    """
    q, k, v = _check_qkv(q_t, k_t, v_t, seq=False)
    _, phi = resolve_feature_map(feature_map)
    normalize = _flag("normalize", normalize)
    eps = _real("eps", eps, min_value=0.0)
    scale = _real("scale", scale)
    gamma = _check_decay(decay, q.shape[1], k.shape[1], q.device)
    squeeze = q.dim() == 4
    if squeeze:
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]

    def decayed(s, z):
        # S_t = (gamma S_{t-1}) + phi(k_t) v_t^T: decaying the incoming state first leaves the
        # plain step (and so the CUDA kernel) unchanged
        if gamma is None:
            return s, z
        g = gamma.to(s.dtype)
        return s * g[None, :, None, None], z * g[None, :, None]

    if isinstance(feature_map, str) and q.is_cuda:
        # One CUDA launch for the whole batch when the extension is usable (attnkit/csrc).
        from ..kernels.linear.cuda import linear_attention_step_cuda, linear_step_reasons

        if not linear_step_reasons(q, k, v, feature_map, state):
            s0 = z0 = None
            if state is not None:
                s0, z0 = decayed(*_check_state(state, q.shape[0], k.shape[1], q.shape[-1],
                                               v.shape[-1], q.device, "state"))
            o, s, z = linear_attention_step_cuda(q, k, v, s0, z0, feature_map, normalize, eps, scale)
            return (o.unsqueeze(2) if squeeze else o), LinearAttentionState(s, z)
    cdt = compute_dtype(q.dtype)
    if isinstance(feature_map, str):  # built-in maps run in fp32, as the kernels do
        fq, fk = phi(q.to(cdt) * scale), phi(k.to(cdt))
    else:
        fq = _apply_map(phi, "q_t", q * scale, q).to(cdt)
        fk = _apply_map(phi, "k_t", k, q).to(cdt)
    B, Hq, F = fq.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    if fk.shape[-1] != F:
        raise ValueError(f"feature_map gave {F} features for q_t but {fk.shape[-1]} for k_t")
    if state is None:
        s, z = fq.new_zeros((B, Hkv, F, Dv)), fq.new_zeros((B, Hkv, F))
    else:
        s, z = _check_state(state, B, Hkv, F, Dv, q.device, "state")
        s, z = decayed(s.to(cdt), z.to(cdt))
    s = s + fk[..., :, None] * v.to(cdt)[..., None, :]  # [B, Hkv, F, 1] * [B, Hkv, 1, Dv]
    z = z + fk
    fq = fq.view(B, Hkv, Hq // Hkv, F)
    o = torch.einsum("bhgf,bhfd->bhgd", fq, s)  # [B, Hkv, G, Dv]
    if normalize:
        o = o / (torch.einsum("bhgf,bhf->bhg", fq, z)[..., None] + eps)
    o = o.reshape(B, Hq, Dv).to(q.dtype)
    return (o.unsqueeze(2) if squeeze else o), LinearAttentionState(s, z)
