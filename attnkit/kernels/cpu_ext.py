"""The CPU extension (``attnkit/csrc/band_cpu.cpp``): built on first use, cached, optional.

It holds one kernel, the fp32 forward of a bounded band's stacked chunks (SlidingWindow and
every ``Band`` with both sides bounded; ``torch_stack`` calls it). Like the CUDA extension
(:mod:`.cuda_ext`) nothing is compiled at install time: the first fp32 window forward on the CPU
builds it with :func:`torch.utils.cpp_extension.load` (g++ and ninja, about 25 s on a 2-core
machine, said once with a warning), into a folder keyed by a hash of the source, the flags and
the torch version; later processes load it in well under a second.

* Cache: ``$XDG_CACHE_HOME/attnkit/cpu_ext/<hash>`` (``~/.cache/attnkit/cpu_ext/<hash>``).
* ``ATTNKIT_DISABLE_CPU_EXT=1`` turns it off: the window then runs on batched ATen matmuls
  (``torch_stack``'s matmul executor, 15-18 % slower there, measured).
* No compiler, no ninja, a torch without MKL's BLAS, or a failed build: one warning saying why,
  then the matmul executor.
* Prebuild (e.g. in a Docker image): ``python -m attnkit.kernels.cpu_ext --build``.

The vector width is the one ATen dispatches to on this CPU
(``torch.backends.cpu.get_cpu_capability()``): the source is compiled with that
``CPU_CAPABILITY`` so that ``at::vec::Vectorized`` is AVX-512 or AVX2 wide (without it, it is
scalar: the softmax took 32 ms where it takes 4, measured).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["DISABLE_ENV", "SOURCE", "cache_dir", "unavailable_reason", "module", "available",
           "build"]

DISABLE_ENV = "ATTNKIT_DISABLE_CPU_EXT"
SOURCE = "band_cpu.cpp"
_BASE_FLAGS = ("-O3", "-fopenmp")
#: -fopenmp links libgomp.so.1, which the dynamic linker resolves to the one torch has loaded
#: (same soname): the kernel's at::parallel_for then shares ATen's thread pool.
_LINK_FLAGS = ("-fopenmp",)
#: ``-m`` flags and the macros ATen's vector headers select their width by, per capability.
_CAPABILITY_FLAGS = {
    "AVX512": ("-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"),
    "AVX2": ("-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"),
}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module", "reason"


def _source() -> Path:
    return Path(__file__).resolve().parent.parent / "csrc" / SOURCE


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # very old torch: build the portable (scalar-vector) variant
        return "DEFAULT"


def _flags() -> list[str]:
    return [*_BASE_FLAGS, *_CAPABILITY_FLAGS.get(_capability(), ())]


def cache_dir() -> Path:
    """The build folder: a hash of the source, the flags and the torch version."""
    h = hashlib.sha256(_source().read_bytes())
    for part in (*_flags(), *_LINK_FLAGS, torch.__version__, platform.machine()):
        h.update(part.encode())
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "attnkit" / "cpu_ext" / h.hexdigest()[:16]


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def unavailable_reason() -> str | None:
    """Why the extension cannot be built here (cheap: builds nothing), or ``None``."""
    if _disabled():
        return f"{DISABLE_ENV}={os.environ[DISABLE_ENV]} is set"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64 (MKL's BLAS), this machine is {platform.machine()}"
    if not torch.backends.mkl.is_available():
        return f"this torch build ({torch.__version__}) has no MKL"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def build(verbose: bool = False):
    """Compile (or reuse the cached build of) the extension; returns the loaded module.
    Raises ``RuntimeError`` with the reason when it cannot be built."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot build attnkit's CPU extension: {reason}")
    from torch.utils import cpp_extension

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    mod = cpp_extension.load(name="attnkit_cpu_ext", sources=[str(_source())],
                             extra_cflags=_flags(),
                             extra_ldflags=list(_LINK_FLAGS), build_directory=str(folder), verbose=verbose)
    if not mod.ready():
        raise RuntimeError("this torch build exports no sgemm_ (BLAS) for the kernel to call")
    return mod


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def module():
    """The loaded extension (building it on the first call of a process), or ``None`` when it
    cannot be used; the first failure is said once with :mod:`warnings` and remembered."""
    if _disabled():  # checked on every call: no warning, nothing cached
        return None
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        reason, mod = unavailable_reason(), None
        if reason is None:
            if not any(cache_dir().glob("*.so")):
                _warn("attnkit: compiling the CPU band kernel (once; about 25 s, cached in "
                      f"{cache_dir()}; ATTNKIT_DISABLE_CPU_EXT=1 skips it)")
            try:
                mod = build()
            except Exception as exc:  # a compiler error, a missing library, ...
                reason = f"building it failed: {type(exc).__name__}: {str(exc).strip()[-600:]}"
        _state["module"], _state["reason"] = mod, reason
        if reason:  # once: the outcome is remembered above
            _warn(f"attnkit: the CPU band kernel is not used ({reason}); sliding-window attention "
                  "runs on batched matmuls instead (15-18 % slower, measured). Set "
                  f"{DISABLE_ENV}=1 to silence this.")
    return _state["module"]


def available() -> str | None:
    """``None`` when the extension is loaded (building it if needed), else why it is not."""
    return None if module() is not None else str(_state.get("reason")
                                                  or f"{DISABLE_ENV} is set")


def _reset_for_tests() -> None:
    _state.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.kernels.cpu_ext",
                                     description="Build (or show the state of) attnkit's CPU "
                                     "extension.")
    parser.add_argument("--build", action="store_true", help="compile now (reuses the cache)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.build:
        t0 = time.perf_counter()
        try:
            build(verbose=args.verbose)
        except Exception as exc:
            print(f"build failed: {exc}", file=sys.stderr)
            return 1
        print(f"built in {time.perf_counter() - t0:.1f} s: {cache_dir()}")
        return 0
    reason = unavailable_reason()
    print(f"source:     {_source()}")
    print(f"cache:      {cache_dir()}")
    print(f"capability: {_capability()}")
    print("status:     " + ("can be built and used" if reason is None else f"not usable: {reason}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
