"""Hugging Face transformers integration: ``attn_implementation="attnkit"``.

Importing this module registers

* an attention function ``"attnkit"`` with ``transformers.AttentionInterface``: it receives
  ``query [B, Hq, Nq, D]``, ``key``/``value [B, Hkv, Nk, D]`` from the model (after the KV cache
  update) and returns ``(out [B, Nq, Hq, D], None)`` computed by :func:`attnkit.attention` (or by
  linear attention, see :class:`LinearAttention`);
* a mask function ``"attnkit"`` with ``transformers.masking_utils.AttentionMaskInterface`` that
  never builds an ``N x N`` mask: it returns ``None`` when no key is padded, else the 2-D bool
  padding mask ``[B, Nk]`` (True = attend) cut to the layer's keys, exactly like transformers'
  own flash-attention mask function.

so ``from_pretrained(..., attn_implementation="attnkit")`` and
``model.set_attn_implementation("attnkit")`` work. What each layer computes:

* **pattern**: causal or bidirectional from the module (``is_causal``), the layer's
  ``sliding_window`` (Mistral, Qwen2, Gemma-style interleaved ``layer_types``; transformers passes
  it per layer) becomes ``SlidingWindow(window - 1, 0)``, and a bidirectional local window
  (ModernBERT) ``SlidingWindow(c, c)`` with ``c = config.sliding_window``, as the model's own mask
  (:func:`~attnkit.attn.hf_specs.model_pattern`); :func:`swap_attention` overrides it for
  all or some layers (any :class:`~attnkit.Pattern`, or :class:`LinearAttention`);
* **padding**: the ``[B, Nk]`` key mask; the pattern applies to tensor positions, as in
  transformers, so left padding works; rows that see no key give zeros;
* **packing** (``DataCollatorWithFlattening``): ``cu_seq_lens_q``/``cu_seq_lens_k`` (and
  ``max_length_q``/``max_length_k``) keyword arguments, or else ``position_ids`` that restart
  inside a row while no padding mask is given, select the ``cu_seqlens`` path: sequences never
  see each other;
* **generation**: transformers' caches (dynamic, sliding-window, static: a static cache's unfilled
  tail is cut off using the padding mask's length, as transformers' flash path does); decoding
  steps are ``Nq = 1`` calls against the cache, bottom-right aligned.

Not supported (a clear error, never wrong numbers): ``output_attentions=True`` (no weights are
ever formed), logit soft-capping, attention sinks, additive position biases (T5), custom dense
4-D masks together with a :func:`swap_attention` override. A 4-D mask given to a model that runs
the model's own pattern (a custom mask, or mask overlays such as bidirectional image tokens) is
handed to transformers' ``sdpa`` function after a one-time warning. Attention dropout is not
applied (one-time warning).
"""

from __future__ import annotations

import numbers
import warnings
import weakref
from collections.abc import Iterable

import torch

try:
    from transformers import AttentionInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "attnkit.hf needs transformers >= 4.48 (AttentionInterface): pip install 'transformers>=4.48'"
    ) from e
try:
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # pragma: no cover - transformers < 4.53 builds 4-D masks itself
    AttentionMaskInterface = None

from .functional import attention
from .hf_specs import (
    CONFIG_KEY,
    LinearAttention,
    Spec,
    check_spec,
    model_pattern,
    spec_from_json,
    spec_to_json,
)

__all__ = [
    "NAME", "attnkit_attention_forward", "attnkit_mask", "swap_attention", "restore_attention",
    "LinearAttention", "set_backend", "get_backend", "register",
]

#: The name registered with transformers.
NAME = "attnkit"

_backend = "auto"
_warned: set[str] = set()


def set_backend(backend: str) -> None:
    """Backend for every Hugging Face attention call: ``"auto"`` (default; ``ATTNKIT_BACKEND``
    overrides it), ``"cuda"`` (decoding steps only), ``"triton"`` or ``"torch"`` (see
    :func:`attnkit.attention`)."""
    global _backend
    if backend not in ("auto", "cuda", "triton", "torch"):
        raise ValueError(
            f"backend must be one of 'auto', 'cuda', 'triton', 'torch', got {backend!r}"
        )
    _backend = backend


def get_backend() -> str:
    return _backend


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"attnkit.hf: {message}", stacklevel=3)


# --------------------------------------------------------------------------------------------
# Mask function
# --------------------------------------------------------------------------------------------


def attnkit_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` entry: ``None`` or a bool ``[B, kv_length]`` key mask.

    ``attention_mask`` is the user's 2-D mask over all tokens seen so far; the layer's keys are
    its last ``kv_length`` columns (a sliding-window cache keeps only the last keys; a static
    cache is longer than the mask, and the mask is then returned whole). Mask overlays that a
    key mask cannot express (``or``/``and`` mask functions, which transformers flags with
    ``use_vmap=True``, and the blockwise overlay of ``block_sequence_ids``) get a dense 4-D mask
    from transformers' ``sdpa_mask`` and, later, the ``sdpa`` attention function, with a one-time
    warning.
    """
    if kwargs.get("use_vmap") or _has_or_overlay(mask_function):
        from transformers.masking_utils import sdpa_mask

        _warn_once("overlay", "this model adds a custom mask overlay (e.g. bidirectional image "
                   "tokens) that attnkit cannot express as a key mask; those masks are built "
                   "dense and run through transformers' 'sdpa'")
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                         q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                         attention_mask=attention_mask, **kwargs)
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:] if attention_mask.shape[-1] > kv_length else attention_mask
    mask = mask.to(torch.bool)
    if mask.shape[-1] == kv_length and bool(mask.all()):  # one sync per forward, as transformers' FA2
        return None
    return mask


def _has_or_overlay(fn, depth: int = 0) -> bool:
    """Whether transformers' mask function unions an overlay into the pattern (``or_masks``).

    ``create_causal_mask(..., block_sequence_ids=...)`` (Gemma 3, PaliGemma, GIT: image tokens
    attend each other bidirectionally) ORs a blockwise overlay in *without* ``use_vmap``; a key
    mask cannot express it, and ignoring it would silently make those tokens causal. The
    ``and`` compositions (sliding window, packing) stay expressible, so only an ``or_mask``
    anywhere in the closures counts.
    """
    if depth > 8 or not callable(fn):
        return False
    if getattr(fn, "__name__", "") == "or_mask":
        return True
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        items = inner if isinstance(inner, tuple) else (inner,)
        if any(_has_or_overlay(f, depth + 1) for f in items if callable(f)):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Packed sequences
# --------------------------------------------------------------------------------------------

_pack_memo: tuple | None = None  # (weakref to position_ids, B, N, result): every layer asks again


def _packing_from_position_ids(position_ids: torch.Tensor, B: int, N: int):
    """``(cu_seqlens int32 [S + 1], max_seqlen)`` over the flattened ``[B * N]`` tokens when some
    row holds several sequences (a position that does not continue the previous one starts a new
    sequence, as transformers' ``find_packed_sequence_indices``), else ``None``."""
    global _pack_memo
    memo = _pack_memo
    if memo is not None and memo[0]() is position_ids and memo[1:3] == (B, N):
        return memo[3]
    pos = position_ids.expand(B, N)
    new = torch.ones(B, N, dtype=torch.bool, device=pos.device)
    new[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = new.reshape(-1).nonzero().flatten()  # one host sync per forward (memoised)
    result = None
    if starts.numel() > B:
        end = torch.tensor([B * N], device=pos.device, dtype=starts.dtype)
        cu = torch.cat([starts, end]).to(torch.int32)
        result = (cu, int((cu[1:] - cu[:-1]).max()))
    _pack_memo = (weakref.ref(position_ids), B, N, result)
    return result


def _packing(kwargs: dict, B: int, nq: int, nk: int, has_mask: bool):
    """``(cu_q, cu_k, max_q, max_k)`` for packed inputs, or ``None``."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        if B != 1:
            raise ValueError(f"cu_seq_lens_q describes packed sequences, which need batch size 1, got {B}")
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        return cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k
    position_ids = kwargs.get("position_ids")
    if has_mask or position_ids is None or nq != nk or nq < 2 or position_ids.shape[-1] != nq:
        return None
    found = _packing_from_position_ids(position_ids, B, nq)
    if found is None:
        return None
    cu, mx = found
    return cu, cu, mx, mx


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D] -> [1, H, B * N, D]`` (a view when B == 1)."""
    B, H, N, D = x.shape
    return x[None, :, 0] if B == 1 else x.transpose(0, 1).reshape(1, H, B * N, D)


def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor):
    bq, bk = cu_q.tolist(), cu_k.tolist()
    return [(bq[s], bq[s + 1], bk[s], bk[s + 1]) for s in range(len(bq) - 1)]


# --------------------------------------------------------------------------------------------
# Which pattern a layer runs
# --------------------------------------------------------------------------------------------


def _layer_spec(module) -> Spec | None:
    """The :func:`swap_attention` override of this module's layer, or ``None`` (the model's own).

    Read from ``module.config.attnkit_attention`` (so a model loaded with ``from_pretrained``
    gets its saved overrides) and memoised on the module until that config entry changes.
    """
    config = getattr(module, "config", None)
    raw = getattr(config, CONFIG_KEY, None)
    memo = module.__dict__.get("_attnkit_spec")
    if memo is not None and memo[0] is raw:
        return memo[1]
    spec = None
    if raw is not None:
        layer = getattr(module, "layer_idx", None)
        layers = raw.get("layers") or {}
        key = str(layer)
        where = f"config.{CONFIG_KEY}"
        if layer is not None and key in layers:
            spec = spec_from_json(layers[key], f"{where}['layers'][{key!r}]")
        else:
            spec = spec_from_json(raw.get("default"), f"{where}['default']")
    module.__dict__["_attnkit_spec"] = (raw, spec)
    return spec


# --------------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------------


def _reject_unsupported(kwargs: dict, softcap, dropout: float) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError(
            "attn_implementation='attnkit' never forms attention weights, so output_attentions=True "
            "cannot be served; load the model with attn_implementation='eager' to inspect weights"
        )
    if softcap is not None:
        raise ValueError(f"attnkit does not support attention logit soft-capping (softcap={softcap}); "
                         "use attn_implementation='eager' or a flash-attention build that does")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("attnkit does not support attention sinks (s_aux); use 'eager' or 'sdpa'")
    if kwargs.get("position_bias") is not None:
        raise ValueError("attnkit does not support additive position biases (position_bias, as in "
                         "T5); use attn_implementation='sdpa'")
    if kwargs.get("head_mask") is not None:
        raise ValueError("attnkit does not support head_mask; use attn_implementation='eager'")
    if dropout:
        _warn_once("dropout", f"attention dropout (p={dropout}) is not applied by attnkit; "
                   "training proceeds without it")


def _reject_chunked(module) -> None:
    """Chunked attention (Llama 4's ``attention_chunk_size``) is a mask transformers builds in
    the mask function; a key mask cannot carry it, so refuse rather than attend across chunks."""
    config = getattr(module, "config", None)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is None:
        return
    types = getattr(config, "layer_types", None)
    layer = getattr(module, "layer_idx", None)
    kind = types[layer] if types is not None and layer is not None and layer < len(types) else None
    if kind is None or "chunk" in str(kind):
        raise ValueError(
            f"attnkit does not support chunked attention (attention_chunk_size={chunk}); use "
            "attn_implementation='sdpa' or 'flex_attention' for this model"
        )


def _sdpa_fallback(module, query, key, value, attention_mask, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _warn_once("dense-mask", f"received a dense {attention_mask.dim()}-D attention mask "
               f"{tuple(attention_mask.shape)}; attnkit only takes key padding masks, so these "
               "calls run transformers' 'sdpa'")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def attnkit_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry.

    Args:
        module: the model's attention module (``is_causal``, ``layer_idx``, ``config``).
        query: ``[B, Hq, Nq, D]``; key, value: ``[B, Hkv, Nk, D]`` (after the cache update, so
            ``Nk >= Nq``; queries are the last ``Nq`` positions).
        attention_mask: ``None`` or the bool ``[B, L]`` key mask from :func:`attnkit_mask`.
        scaling: the model's softmax scale. sliding_window: the layer's window (tokens).
        kwargs: transformers' extra arguments (``position_ids``, ``cu_seq_lens_q``, ...).

    Returns:
        ``(out [B, Nq, Hq, Dv], None)``.
    """
    _reject_unsupported(kwargs, softcap, dropout)
    _reject_chunked(module)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    spec = _layer_spec(module)

    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        if spec is not None:
            raise ValueError(
                f"this layer runs the attnkit override {spec!r}, which cannot be combined with the "
                f"dense {attention_mask.dim()}-D attention mask {tuple(attention_mask.shape)} the "
                "model passed; give a 2-D padding mask, or restore_attention(model)"
            )
        return _sdpa_fallback(module, query, key, value, attention_mask, scaling, is_causal, kwargs)

    kpm = attention_mask
    if kpm is not None:
        if kpm.shape[1] < key.shape[2]:  # a static cache: keys past the mask are unfilled slots
            key, value = key[:, :, : kpm.shape[1]], value[:, :, : kpm.shape[1]]
        elif kpm.shape[1] > key.shape[2]:
            kpm = kpm[:, -key.shape[2]:]

    B, Hq, Nq, D = query.shape
    Nk = key.shape[2]
    packed = _packing(kwargs, B, Nq, Nk, kpm is not None)
    if packed is not None and B > 1:
        query, key, value = _flatten(query), _flatten(key), _flatten(value)

    if isinstance(spec, LinearAttention):
        from .hf_linear import hf_linear_attention

        segments = _segments(packed[0], packed[1]) if packed is not None else None
        out = hf_linear_attention(query, key, value, kpm, spec, bool(is_causal), segments)
    else:
        config_window = getattr(getattr(module, "config", None), "sliding_window", None)
        pattern = spec if spec is not None else model_pattern(bool(is_causal), sliding_window,
                                                              config_window)
        out = _softmax(query, key, value, pattern, scaling, kpm, packed)

    if packed is not None and B > 1:  # [1, H, B * N, Dv] -> [B, H, N, Dv]
        out = out[0].reshape(Hq, B, Nq, -1).transpose(0, 1)
    return out.transpose(1, 2), None


def _softmax(q, k, v, pattern, scaling, kpm, packed):
    """:func:`attnkit.attention`, with value head dims unequal to the query's padded to match."""
    dq, dv = q.shape[-1], v.shape[-1]
    if dv < dq:
        v = torch.nn.functional.pad(v, (0, dq - dv))
    elif dv > dq:  # zero features add nothing to q . k; the scale is passed explicitly
        q = torch.nn.functional.pad(q, (0, dv - dq))
        k = torch.nn.functional.pad(k, (0, dv - dq))
    scale = float(scaling) if scaling is not None else dq ** -0.5
    kw = {}
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        kw = dict(cu_seqlens=(cu_q, cu_k), max_seqlen=(max_q, max_k))
    out = attention(q, k, v, pattern, scale=scale, valid_keys=kpm, backend=_backend, **kw)
    return out[..., :dv] if out.shape[-1] != dv else out


# --------------------------------------------------------------------------------------------
# swap_attention / restore_attention
# --------------------------------------------------------------------------------------------


def _base_model(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    from transformers import PreTrainedModel

    inner = model
    for _ in range(4):  # PeftModel -> LoraModel -> the transformers model
        if isinstance(inner, PreTrainedModel):
            return inner
        get = getattr(inner, "get_base_model", None)
        inner = get() if callable(get) else getattr(inner, "model", None)
    if isinstance(inner, PreTrainedModel):
        return inner
    raise TypeError(
        f"model must be a transformers PreTrainedModel (or a PEFT model wrapping one), got "
        f"{type(model).__name__}"
    )


def _attention_modules(base) -> list[torch.nn.Module]:
    """Modules that transformers' attention functions receive: they carry an int ``layer_idx``."""
    return [m for m in base.modules() if isinstance(getattr(m, "layer_idx", None), int)
            and hasattr(m, "config")]


def _set_implementation(base, name: str) -> None:
    setter = getattr(base, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    else:  # transformers < 4.56: no setter; the attribute is read at every call
        base.config._attn_implementation = name


def _check_layers(layers: object, available: set[int]) -> list[int]:
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, Iterable) or isinstance(layers, (str, bytes)):
        raise TypeError(f"layers must be an int, an iterable of ints or None, got {type(layers).__name__}")
    out = []
    n = max(available) + 1 if available else 0
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"layers must hold ints, got {i!r}")
        i = int(i) + (n if i < 0 else 0)  # -1 = the last layer
        if i not in available:
            raise ValueError(f"layers: no attention layer {i}; this model has layers 0..{n - 1}")
        out.append(i)
    return out


def _live_from_raw(raw: dict) -> dict:
    """Spec objects for a config entry (a model loaded with saved overrides)."""
    where = f"config.{CONFIG_KEY}"
    return {
        "default": spec_from_json(raw.get("default"), f"{where}['default']"),
        "layers": {int(k): spec_from_json(v, f"{where}['layers'][{k!r}]")
                   for k, v in (raw.get("layers") or {}).items()},
    }


def swap_attention(model, pattern: Spec | None = None, *, layers: int | Iterable[int] | None = None):
    """Run ``model``'s attention on attnkit, optionally with another pattern.

    Args:
        model: a transformers ``PreTrainedModel`` or a PEFT model wrapping one (changed in place).
        pattern: ``None`` keeps each layer's own pattern (causal/bidirectional, its sliding
            window); an :class:`~attnkit.Pattern` (``SlidingWindow(1023)``, a ``BlockSparse``
            pattern, ``Dense()``, ...) or :class:`LinearAttention` replaces it. Padding and packing
            still apply on top of the pattern.
        layers: ``None`` sets ``pattern`` for every layer and drops earlier per-layer overrides;
            an int or ints (``-1`` = the last layer) set it for those layers only, on top of
            earlier calls. So ``swap_attention(m, SlidingWindow(1023))`` then
            ``swap_attention(m, None, layers=[-2, -1])`` gives every layer but the last two a
            window and leaves the last two as the model built them.

    The override is stored as JSON in ``config.attnkit_attention`` and saved by
    ``save_pretrained``; ``from_pretrained(path, attn_implementation="attnkit")`` after
    ``import attnkit.hf`` runs it again (the implementation name itself is not saved by
    transformers). Patterns holding Python callables cannot be saved (a warning says so).

    Returns:
        ``model``.
    """
    base = _base_model(model)
    spec = None if pattern is None else check_spec(pattern)
    modules = _attention_modules(base)
    available = {m.layer_idx for m in modules}
    raw_spec = spec_to_json(spec)
    if raw_spec is not None and "unsaved" in raw_spec:
        _warn_once(f"unsaved:{raw_spec['unsaved']}", f"{spec!r} cannot be written to the config "
                   "as JSON; it applies to this model object but save_pretrained will not keep it")

    old = getattr(base.config, CONFIG_KEY, None) or {}
    live = base.__dict__.get("_attnkit_live") or _live_from_raw(old)
    if layers is None:
        raw = {"default": raw_spec, "layers": {}}
        live = {"default": spec, "layers": {}}
    else:
        chosen = _check_layers(layers, available)
        raw = {"default": old.get("default"), "layers": dict(old.get("layers") or {})}
        live = {"default": live["default"], "layers": dict(live["layers"])}
        for i in chosen:
            raw["layers"][str(i)] = raw_spec
            live["layers"][i] = spec

    configs = {id(base.config): base.config}
    for m in modules:
        configs.setdefault(id(m.config), m.config)
    for cfg in configs.values():
        setattr(cfg, CONFIG_KEY, raw)
    for m in modules:  # the live objects (callables included) for this process
        layer_spec = live["layers"].get(m.layer_idx, live["default"])
        m.__dict__["_attnkit_spec"] = (raw, layer_spec)
    base.__dict__["_attnkit_live"] = live

    current = base.config._attn_implementation
    if current != NAME:
        base.__dict__["_attnkit_previous"] = current
        _set_implementation(base, NAME)
    return model


def restore_attention(model):
    """Undo :func:`swap_attention`: the implementation the model had before (``"sdpa"`` for a
    model loaded with ``attn_implementation="attnkit"``), and no attnkit override in its config.
    Returns ``model``."""
    base = _base_model(model)
    previous = base.__dict__.pop("_attnkit_previous", None) or "sdpa"
    for cfg in {id(c): c for c in [base.config] + [m.config for m in _attention_modules(base)]}.values():
        if hasattr(cfg, CONFIG_KEY):
            delattr(cfg, CONFIG_KEY)
    for m in _attention_modules(base):
        m.__dict__.pop("_attnkit_spec", None)
    base.__dict__.pop("_attnkit_live", None)
    _set_implementation(base, previous)
    return model


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def register() -> None:
    """Register ``"attnkit"`` with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, attnkit_attention_forward)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(NAME, attnkit_mask)


register()
