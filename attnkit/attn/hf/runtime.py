"""Process-wide settings of the Hugging Face glue: the registered name, the backend, warnings."""

from __future__ import annotations

import warnings

__all__ = ["NAME", "set_backend", "get_backend"]

#: The name registered with transformers' AttentionInterface and AttentionMaskInterface.
NAME = "attnkit"

_BACKENDS = ("auto", "cuda", "triton", "torch")
_backend = "auto"
#: Keys of the one-time warnings already shown (tests clear it to see a warning again).
_warned: set[str] = set()


def set_backend(backend: str) -> None:
    """Backend for every Hugging Face attention call: ``"auto"`` (default; ``ATTNKIT_BACKEND``
    overrides it), ``"cuda"`` (decoding steps only), ``"triton"`` or ``"torch"`` (see
    :func:`attnkit.attention`)."""
    global _backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    _backend = backend


def get_backend() -> str:
    return _backend


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"attnkit.hf: {message}", stacklevel=3)
