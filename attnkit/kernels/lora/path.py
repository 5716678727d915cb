"""Fused kernel or cuBLAS: ``lora_linear``'s measured choice under ``backend="auto"``.

The fused Triton kernel saves a pass over the output, but cuBLAS's base GEMM may still beat it
(tile quality, small T). So on first use per (device, dtype, mode, shape bucket) both paths are
timed with CUDA events and the faster one is kept:

* ``"fused"``: :func:`~.op.lora_linear_triton` (the Triton backend);
* ``"cublas"``: the unfused path, :func:`~.torch_impl.lora_linear_torch`: ``addmm(bias, x, W^T)``
  then ``addmm_(y, s * drop(x) A^T, B^T)``, with its own backward (the torch backend).

Fused only wins when strictly faster, so the fused path is never the slower one. ``mode`` is
``"train"`` (forward + backward timed) or ``"infer"`` (forward). The key buckets ``T`` and ``r``
to powers of two and keeps ``in``/``out`` exact (a model has a handful); it also names the
device, dtype, bias, dropout and the attnkit/triton versions, so an upgrade measures again.

Decisions are cached in memory and in ``$ATTNKIT_CACHE_DIR/lora_dispatch.json`` (default
``$XDG_CACHE_HOME/attnkit`` or ``~/.cache/attnkit``). ``ATTNKIT_LORA_PATH``: ``auto`` (default,
measure), ``fused`` or ``cublas`` (force one, no timing). Nothing is timed on CPU tensors, while
``torch.compile`` traces, or during CUDA-graph capture: those keep the fused kernel.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..timing import cuda_event_times

__all__ = ["ENV", "PATHS", "path_setting", "cache_file", "dispatch_key", "choose_path",
           "cuda_event_timer", "PathCache"]

ENV = "ATTNKIT_LORA_PATH"
PATHS = ("auto", "fused", "cublas")
log = logging.getLogger("attnkit.lora")

#: ``timer(path, fn) -> milliseconds`` per call of ``fn`` (``path``: ``"fused"`` or ``"cublas"``).
Timer = Callable[[str, Callable[[], object]], float]


def path_setting() -> str:
    """``ATTNKIT_LORA_PATH`` (``"auto"`` when unset or empty); a bad value is a ValueError."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in PATHS:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(map(repr, PATHS))} "
                         "(auto: measure once per shape and keep the faster)")
    return value


def cache_file() -> Path:
    """Where decisions are kept: ``$ATTNKIT_CACHE_DIR`` or the user cache dir."""
    root = os.environ.get("ATTNKIT_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "attnkit")
    return Path(root) / "lora_dispatch.json"


def _pow2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


@functools.cache
def _versions() -> str:
    import triton

    from ..._version import __version__

    return f"attnkit{__version__}-triton{triton.__version__}"


@functools.cache
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def dispatch_key(call, device_name: str | None = None) -> str:
    """The cache key of a ``lora_linear`` call (a :class:`~.backends.LoRACall`)."""
    x = call.x
    T, n_in = x.shape
    if device_name is None:
        device_name = _device_name(x.device.index) if x.is_cuda else str(x.device)
    mode = "train" if call.needs_grad else "infer"
    dtype = str(x.dtype).replace("torch.", "")
    return (f"{device_name}|{dtype}|{mode}|T{_pow2(T)}|in{n_in}|out{call.weight.shape[0]}|"
            f"r{_pow2(call.rank)}|bias{int(call.bias is not None)}|"
            f"drop{int(call.dropout_p > 0)}|{_versions()}")


class PathCache:
    """Decisions by key, in memory and in a JSON file (read once, merged on every write)."""

    def __init__(self, file: Path | None = None):
        self.file = file
        self._mem: dict[str, dict] | None = None
        self._warned = False  # an unwritable file is reported once

    def _load(self) -> dict[str, dict]:
        if self._mem is None:
            self._mem = {}
            file = self.file or cache_file()
            try:
                data = json.loads(file.read_text())
                if isinstance(data, dict):
                    self._mem = {k: v for k, v in data.items()
                                 if isinstance(v, dict) and v.get("path") in ("fused", "cublas")}
            except (OSError, ValueError):
                pass  # no file yet, or unreadable: measure again
        return self._mem

    def get(self, key: str) -> dict | None:
        return self._load().get(key)

    def put(self, key: str, entry: dict) -> None:
        self._load()[key] = entry
        file = self.file or cache_file()
        try:  # merge with what other processes wrote since, then replace atomically
            try:
                on_disk = json.loads(file.read_text())
                on_disk = on_disk if isinstance(on_disk, dict) else {}
            except (OSError, ValueError):
                on_disk = {}
            on_disk.update(self._mem)
            file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".lora_dispatch.")
            with os.fdopen(fd, "w") as f:
                json.dump(on_disk, f, indent=1, sort_keys=True)
            os.replace(tmp, file)
        except OSError as err:  # a read-only home must not fail a forward pass
            if self._warned:
                return
            self._warned = True
            log.warning("attnkit.lora_linear: could not write the dispatch cache %s (%s); the "
                        "choices are kept in memory only", file, err)

    def clear(self) -> None:
        self._mem = None


#: The process's cache (tests swap it for one on a tmp_path).
CACHE = PathCache()
#: Keys whose decision was already logged in this process.
_said: set[str] = set()


def cuda_event_timer(path: str, fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds per call of ``fn`` on the current CUDA stream (CUDA events). The
    warm-up calls also run the fused kernel's autotuning, so it is not timed."""
    return statistics.median(cuda_event_times(fn, warmup, reps))


def _bench_fns(call, fused: Callable, unfused: Callable) -> dict[str, Callable[[], object]]:
    """One closure per path running ``call``'s shape on fresh inputs: the forward, and with
    ``needs_grad`` the backward too (x, A and B get gradients, W stays frozen)."""
    grad = call.needs_grad
    x = torch.randn_like(call.x).requires_grad_(grad)
    a = torch.randn_like(call.lora_a).requires_grad_(grad)
    b = torch.randn_like(call.lora_b).requires_grad_(grad)
    w = call.weight.detach()
    bias = None if call.bias is None else call.bias.detach()
    dy = torch.randn(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

    def runner(fn):
        def run():
            with torch.enable_grad() if grad else torch.no_grad():
                y = fn(x, w, bias, a, b, call.scaling, call.dropout_p, 1234)
                if grad:
                    torch.autograd.backward(y, dy)
            return y
        return run

    return {"fused": runner(fused), "cublas": runner(unfused)}


def _default_fns():
    from .op import lora_linear_triton
    from .torch_impl import lora_linear_torch

    def fused(x, w, bias, a, b, s, p, seed):
        # the seed drawn on the device, as TritonLoRA.run does (no host-to-device copy timed)
        seed_t = torch.randint(0, 2**31 - 1, (1,), device=x.device) if p > 0 else None
        return lora_linear_triton(x, w, bias, a, b, s, p, seed_t)

    def unfused(x, w, bias, a, b, s, p, seed):
        return lora_linear_torch(x, w, bias, a, b, s, p, seed if p > 0 else None)

    return fused, unfused


def _can_measure(call) -> bool:
    if not call.x.is_cuda or call.x.shape[0] == 0:
        return False
    return not torch.cuda.is_current_stream_capturing()


def choose_path(call, timer: Timer | None = None, cache: PathCache | None = None,
                fns: tuple[Callable, Callable] | None = None, device_name: str | None = None) -> str:
    """``"fused"`` or ``"cublas"`` for a ``lora_linear`` call the Triton backend can run, under
    ``ATTNKIT_LORA_PATH=auto``: the cached decision, else measured now (``timer``; default
    :func:`cuda_event_timer`, only on CUDA tensors), cached and logged once.

    ``fns``: ``(fused, unfused)``, each ``f(x, w, bias, a, b, scaling, dropout_p, seed) -> y``
    (default: the Triton op and the torch op). Calls that cannot be timed (see the module
    docstring) get ``"fused"`` and are not cached.
    """
    if torch.compiler.is_compiling():
        return "fused"  # before the key: the device-name lookup and file reads would break graphs
    cache = CACHE if cache is None else cache
    key = dispatch_key(call, device_name)
    hit = cache.get(key)
    if hit is not None:
        if key not in _said:
            _said.add(key)
            log.info("attnkit.lora_linear: %s path for %s (measured earlier: fused %s ms, cuBLAS "
                     "%s ms; from %s)", hit["path"], key, hit.get("fused_ms"), hit.get("cublas_ms"),
                     cache.file or cache_file())
        return hit["path"]
    if timer is None:
        if not _can_measure(call):
            return "fused"
        timer = cuda_event_timer
    fused, unfused = fns or _default_fns()
    runs = _bench_fns(call, fused, unfused)
    ms = {path: float(timer(path, fn)) for path, fn in runs.items()}
    path = "fused" if ms["fused"] < ms["cublas"] else "cublas"
    cache.put(key, {"path": path, "fused_ms": ms["fused"], "cublas_ms": ms["cublas"]})
    _said.add(key)
    log.info("attnkit.lora_linear: %s path for %s (fused %.4f ms, cuBLAS %.4f ms; %s=fused|cublas "
             "forces one)", path, key, ms["fused"], ms["cublas"], ENV)
    return path
