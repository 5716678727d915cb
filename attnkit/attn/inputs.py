"""Validation and normalisation of the arguments of :func:`attnkit.attention`.

Every check raises a ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong
value) that names the argument, the value received and what would be accepted.
"""

from __future__ import annotations

import numbers

import torch

from ..kernels.flash.call import AttentionCall
from ..kernels.flash.spec import SPEC_KINDS
from .patterns import Pattern, as_pattern

#: Dtypes some backend can compute in; each backend narrows this in its capabilities.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


#: Why ``key_padding_mask`` is refused: the same name means the opposite in PyTorch.
_KEY_PADDING_MASK_REMOVED = (
    "key_padding_mask is not accepted: torch.nn.MultiheadAttention's argument of that name marks "
    "PADDING with True, while attnkit's key mask marks the keys to ATTEND with True (the sense of "
    "SDPA's bool attn_mask and of transformers' attention_mask). Pass valid_keys=mask with "
    "True = a real key to attend and False = padding; a PyTorch-style padding mask converts with "
    "valid_keys=~key_padding_mask"
)


def refuse_unknown_kwargs(where: str, kwargs: dict) -> None:
    """Raise the ``TypeError`` Python would, but explain the one removed argument users carry over
    from PyTorch (``key_padding_mask``, whose True means the opposite there)."""
    if "key_padding_mask" in kwargs:
        raise TypeError(f"{where}: {_KEY_PADDING_MASK_REMOVED}")
    if kwargs:
        names = ", ".join(map(repr, kwargs))
        raise TypeError(f"{where}() got unexpected keyword argument(s) {names}")


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_cu_seqlens(name: str, cu: object, n: int, device: torch.device) -> torch.Tensor:
    cu = _check_tensor(name, cu)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor [S + 1] with S >= 1, got shape {tuple(cu.shape)}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype torch.int32 (or int64), got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}; put them on one device")
    # Checking values on a GPU would synchronise: they are checked on the CPU only.
    bad = cu.device.type == "cpu" and (
        int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > n
    )
    if bad:
        raise ValueError(
            f"{name} must start at 0, be non-decreasing and end at most at N = {n}, got {cu.tolist()}"
        )
    return cu.to(torch.int32).contiguous()


def _check_max_seqlen(name: str, value: object, cu: torch.Tensor) -> int:
    if value is None:
        # One device->host sync; pass max_seqlen to avoid it (and under torch.compile).
        return int((cu[1:] - cu[:-1]).max())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    # Too small a value makes the kernels skip rows. Checked where it costs no device sync (CPU
    # cu_seqlens); on a GPU it is the caller's contract, as in flash-attention's varlen API.
    if cu.device.type == "cpu" and cu.numel() > 1:
        longest = int((cu[1:] - cu[:-1]).max())
        if value < longest:
            raise ValueError(
                f"{name} must be at least the longest packed sequence ({longest}), got {value}"
            )
    return int(value)


def _pair(name: str, value: object) -> tuple[object, object]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value or a (q, k) pair, got {len(value)} values")
        return value[0], value[1]
    return value, value


def _check_score_mods(softcap, sinks, alibi_slopes, B: int, Hq: int, device):
    """``softcap``: a finite float > 0 (or None); ``sinks``: float ``[Hq]``; ``alibi_slopes``: float
    ``[Hq]`` or ``[B, Hq]``. Tensors come back as fp32 on the call's device (the cast keeps the
    sinks' gradient flowing to the caller's tensor)."""
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be a float > 0 or None, got {type(softcap).__name__}")
        softcap = float(softcap)
        if not (softcap > 0 and softcap != float("inf")):
            raise ValueError(f"softcap must be a finite float > 0 (scores become "
                             f"softcap * tanh(s / softcap)), got {softcap}")
    out = []
    for name, t, shapes in (("sinks", sinks, ((Hq,),)), ("alibi_slopes", alibi_slopes, ((Hq,), (B, Hq)))):
        if t is not None:
            t = _check_tensor(name, t)
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
            if tuple(t.shape) not in shapes:
                want = " or ".join(str(list(sh)) for sh in shapes)
                raise ValueError(f"{name} must have shape {want} ([Hq] = one per query head), got "
                                 f"{list(t.shape)}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but q is on {device}")
            t = _as_score_tensor(name, t)
        out.append(t)
    return softcap, out[0], out[1]


def _as_score_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """A checked ``sinks`` / ``alibi_slopes`` tensor as the kernels take it: fp32 (the cast keeps
    the sinks' gradient flowing to the caller's tensor; slopes get none)."""
    if name == "alibi_slopes" and t.requires_grad:
        t = t.detach()  # slopes are fixed per head (no gradient is computed for them)
    return t.float()


def _check_qkv(q: object, k: object, v: object) -> None:
    """Tensors, 4-D, a floating dtype, one dtype: raise for the first of these that fails."""
    q, k, v = (_check_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            layout = "[B, Hq, Nq, D]" if name == "q" else "[B, Hkv, Nk, D]"
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; expected a floating dtype: float16, bfloat16, "
                "float32 (or float64 on the torch backend)"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def validate(
    q: object,
    k: object,
    v: object,
    pattern: object,
    scale: object,
    valid_keys: object,
    cu_seqlens: object,
    max_seqlen: object,
    return_lse: bool,
    softcap: object = None,
    sinks: object = None,
    alibi_slopes: object = None,
) -> AttentionCall:
    """Check every argument of :func:`attnkit.attention` and return the normalised call."""
    # The hot path (every forward): one combined test; the itemised checks, in their order and
    # with their messages, run only when it fails.
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor) and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
            and q.dtype in FLOAT_DTYPES and q.dtype == k.dtype == v.dtype):
        _check_qkv(q, k, v)
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    B, Hq, Nq, D = q.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must share [B, Hkv, Nk] (k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv]), got k "
            f"{tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if v.shape[3] < 1:
        raise ValueError(f"v has head dim {v.shape[3]}; it must be >= 1")
    if k.shape[0] != B:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {B}")
    if k.shape[3] != D:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {D}; they must match")
    if D < 1:
        raise ValueError(f"q has head dim {D}; it must be >= 1")
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"the number of query heads ({Hq}) must be a multiple of the number of key/value "
            f"heads ({Hkv}) (GQA/MQA)"
        )

    pattern = as_pattern(pattern)

    if scale is None:
        scale = D**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}")

    if valid_keys is not None:
        m = _check_tensor("valid_keys", valid_keys)
        if m.dtype != torch.bool:
            raise TypeError(
                f"valid_keys must be a bool tensor [B, Nk] (True = attend, False = padding), got dtype "
                f"{m.dtype}; an additive float mask converts with `mask == 0`"
            )
        if tuple(m.shape) != (B, Nk):
            raise ValueError(f"valid_keys must have shape [B, Nk] = [{B}, {Nk}], got {tuple(m.shape)}")
        if m.device != q.device:
            raise ValueError(f"valid_keys is on {m.device} but q is on {q.device}")
        valid_keys = m

    cu_q = cu_k = None
    max_q = max_k = None
    if cu_seqlens is not None:
        if valid_keys is not None:
            raise ValueError(
                "pass either valid_keys or cu_seqlens, not both: packed sequences carry "
                "their lengths in cu_seqlens"
            )
        if B != 1:
            raise ValueError(f"with cu_seqlens, q/k/v pack all sequences into B = 1, got B = {B}")
        raw_q, raw_k = _pair("cu_seqlens", cu_seqlens)
        cu_q = _check_cu_seqlens("cu_seqlens", raw_q, Nq, q.device)
        cu_k = cu_q if raw_k is raw_q else _check_cu_seqlens("cu_seqlens (keys)", raw_k, Nk, q.device)
        if cu_q.numel() != cu_k.numel():
            raise ValueError(
                f"cu_seqlens for queries and keys must describe the same number of sequences, got "
                f"{cu_q.numel() - 1} and {cu_k.numel() - 1}"
            )
        mq, mk = _pair("max_seqlen", max_seqlen)
        max_q = _check_max_seqlen("max_seqlen", mq, cu_q)
        max_k = max_q if (cu_k is cu_q and mk is mq) else _check_max_seqlen("max_seqlen", mk, cu_k)
    elif max_seqlen is not None:
        raise ValueError("max_seqlen is only meaningful together with cu_seqlens")

    if cu_q is not None:
        pattern.check_call(cu_q.numel() - 1, Hq, max_q, max_k, same_packing=raw_k is raw_q)
    else:
        pattern.check_call(B, Hq, Nq, Nk, same_packing=True)

    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")

    softcap, sinks, alibi_slopes = _check_score_mods(softcap, sinks, alibi_slopes, B, Hq, q.device)

    nq, nk = (max_q, max_k) if cu_q is not None else (Nq, Nk)
    spec = pattern.compile(nq, nk, q.device)  # TypeError for a pattern that cannot compile
    if getattr(spec, "kind", None) not in SPEC_KINDS:
        raise TypeError(
            f"pattern {pattern!r} compiled to {type(spec).__name__}, which is not a kernel spec "
            "(a Band or BlockLists from attnkit.kernels.flash.spec)"
        )

    return AttentionCall(
        q=q, k=k, v=v, pattern=pattern, spec=spec, scale=scale, valid_keys=valid_keys,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        return_lse=return_lse, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
    )


# --------------------------------------------------------------------------------------------
# The cached path: a call whose signature validated once is not validated again
# --------------------------------------------------------------------------------------------

_Tensor = torch.Tensor
#: Pattern classes whose instances are immutable values (a frozen dataclass declared on the class
#: itself): only those may stand in a cache key. Filled per class on first sight.
_IMMUTABLE_PATTERNS: dict[type, bool] = {}


def _immutable_pattern(cls: type) -> bool:
    known = _IMMUTABLE_PATTERNS.get(cls)
    if known is None:
        params = cls.__dict__.get("__dataclass_params__")
        known = _IMMUTABLE_PATTERNS[cls] = bool(
            issubclass(cls, Pattern) and params is not None and params.frozen)
    return known


def call_signature(q, k, v, pattern, scale, valid_keys, return_lse, softcap, sinks,
                   alibi_slopes) -> tuple | None:
    """Everything :func:`validate` and the dispatch read from a call without ``cu_seqlens``,
    except the tensors' data: a hashable key, or ``None`` for a call that takes the full path
    every time.

    The key holds the shapes, strides, dtypes and devices of ``q``/``k``/``v`` and of each
    optional tensor that is given, the pattern (by value: patterns are frozen dataclasses, and
    ``BlockSparse`` compares by identity), ``scale`` and ``softcap`` (plain floats only: an int,
    a bool or a NumPy scalar takes the full path, so no ``True == 1`` can pass for a checked
    value), ``return_lse`` (a bool), and whether the call needs gradients. Validation is a pure
    function of these (the ``cu_seqlens`` checks read values: packed calls are never keyed), so a
    key that validated once validates again; :func:`validate` runs on every new key, with every
    message. Tensor subclasses, unhashable or mutable patterns take the full path."""
    if not (type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor):
        return None
    if not (scale is None or scale.__class__ is float) or return_lse.__class__ is not bool:
        return None
    if not (softcap is None or softcap.__class__ is float):
        return None
    if pattern is not None and not _immutable_pattern(pattern.__class__):
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    extra = None
    if valid_keys is not None or sinks is not None or alibi_slopes is not None:
        extra = []
        for t in (valid_keys, sinks, alibi_slopes):
            if t is None:
                extra.append(None)
            elif type(t) is not _Tensor:
                return None
            else:
                extra.append((t.shape, t.stride(), t.dtype, t.device, t.requires_grad))
        extra = tuple(extra)
        if sinks is not None and not grad:
            grad = torch.is_grad_enabled() and sinks.requires_grad
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype,
            v.dtype, q.device, k.device, v.device, pattern, scale, softcap, return_lse, grad,
            extra)


def score_tensors(sinks, alibi_slopes):
    """``(sinks, alibi_slopes)`` as :func:`validate` hands them on, for a call whose signature
    validated (fp32; the slopes detached)."""
    return (None if sinks is None else _as_score_tensor("sinks", sinks),
            None if alibi_slopes is None else _as_score_tensor("alibi_slopes", alibi_slopes))
