"""The CUDA extension (``attnkit/csrc``): built on first use, cached, optional.

Nothing is compiled at ``pip install`` time, so attnkit installs as pure Python on any machine.
The first call that could use a CUDA kernel (a decode-shaped attention call, a linear-attention
step or a multi-adapter LoRA batch on a GPU) builds the extension with
:func:`torch.utils.cpp_extension.load` (ninja, ``-O3``, ``-gencode`` for the visible GPUs'
compute capabilities) into a cache folder keyed by a hash of the sources, flags, architectures and
torch/CUDA versions, and loads it; later processes load the cached library in well under a second.

* Cache: ``$TORCH_EXTENSIONS_DIR/attnkit_cuda/<hash>`` when that variable is set, else
  ``$XDG_CACHE_HOME/attnkit/cuda_ext/<hash>`` (``~/.cache/attnkit/cuda_ext/<hash>``).
* ``ATTNKIT_DISABLE_CUDA=1`` turns the extension off (Triton/torch kernels are used).
* No CUDA build of torch, no GPU, a GPU older than sm_80, no ``nvcc`` or no ``ninja``, or a failed
  build: one warning saying why, then the Triton/torch kernels.
* Prebuild (e.g. in a Docker image)::

      python -m attnkit.kernels.cuda_ext --build            # for the visible GPUs
      python -m attnkit.kernels.cuda_ext --build --arch 90  # without a GPU
      python -m attnkit.kernels.cuda_ext --status

The ops are registered as ``torch.ops.attnkit_cuda.*``; their fake implementations (so
``torch.compile`` can trace them) are registered here once the library is loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = [
    "DISABLE_ENV", "SOURCES", "source_dir", "cache_dir", "cuda_home", "find_nvcc",
    "unavailable_reason", "load", "available", "ops", "build",
]

DISABLE_ENV = "ATTNKIT_DISABLE_CUDA"
#: Files compiled into the extension (all under :func:`source_dir`); headers go into the hash.
SOURCES = ("bindings.cpp", "decode_attention.cu", "linear_decode.cu", "lora_bgmv.cu")
HEADERS = ("attnkit_cuda.h", "common.cuh")
#: cp.async and bf16 arithmetic need Ampere or newer.
MIN_CAPABILITY = (8, 0)
# No -std here: torch picks the C++ standard its headers need (C++17 or C++20 by version); the
# kernels are plain C++17 (the CI compile test checks that).
NVCC_FLAGS = ("-O3", "-lineinfo")
CXX_FLAGS = ("-O3",)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "reason": str, "warned": bool


def source_dir() -> Path:
    """``attnkit/csrc``: shipped inside the package (package data), so editable and regular
    installs find it next to this module."""
    return Path(__file__).resolve().parent.parent / "csrc"


def _cache_root() -> Path:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env).expanduser() / "attnkit_cuda"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "attnkit" / "cuda_ext"


def cuda_home() -> str | None:
    """The CUDA toolkit root: ``$CUDA_HOME``, ``$CUDA_PATH``, ``/usr/local/cuda``, or the folder
    above the ``nvcc`` on ``PATH`` (when it holds ``include/cuda_runtime_api.h``)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return root
    if os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        return "/usr/local/cuda"
    found = shutil.which("nvcc")
    if found:
        root = Path(found).resolve().parent.parent
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return str(root)
    return None


def _has_runtime_headers(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_nvcc() -> str | None:
    """Path of ``nvcc``: under :func:`cuda_home`, else the one on ``PATH``."""
    root = cuda_home()
    if root:
        return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def _device_archs() -> list[int]:
    """Compute capabilities (``major * 10 + minor``) of the visible GPUs, sorted, unique."""
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(10 * major + minor for major, minor in caps)


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def _arch_flags(archs: list[int]) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def cache_dir(archs: list[int]) -> Path:
    """The build folder for these architectures: a hash of sources, flags and versions."""
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode())
        h.update((source_dir() / name).read_bytes())
    for part in (*NVCC_FLAGS, *CXX_FLAGS, *_arch_flags(archs), torch.__version__, str(torch.version.cuda)):
        h.update(part.encode())
    return _cache_root() / h.hexdigest()[:16]


def unavailable_reason(archs: list[int] | None = None) -> str | None:
    """Why the extension cannot be built or used here (cheap: builds nothing), or ``None``.

    ``archs`` given (a prebuild for another machine): the GPU checks are skipped.
    """
    if _disabled():
        return f"{DISABLE_ENV}={os.environ[DISABLE_ENV]} is set"
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if archs is None:
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        old = [a for a in _device_archs() if a < 10 * MIN_CAPABILITY[0] + MIN_CAPABILITY[1]]
        if old:
            return f"the CUDA kernels need compute capability 8.0 or newer, found sm_{old[0]}"
    if find_nvcc() is None:
        return "no CUDA toolkit found (nvcc is not in CUDA_HOME/bin, PATH or /usr/local/cuda/bin)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _warn_once(reason: str) -> None:
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(
            f"attnkit: the CUDA kernels are not used ({reason}); falling back to the Triton/torch "
            "kernels. Set ATTNKIT_DISABLE_CUDA=1 to silence this.",
            stacklevel=3,
        )


def build(archs: list[int] | None = None, verbose: bool = False) -> Path:
    """Compile (or reuse the cached build of) the extension and load it into this process.

    Returns the build folder. Raises ``RuntimeError`` with the reason when it cannot be built.
    """
    archs = archs or _device_archs()
    reason = unavailable_reason(archs if archs else None)
    if reason:
        raise RuntimeError(f"cannot build the attnkit CUDA extension: {reason}")
    from torch.utils import cpp_extension

    root = cuda_home()
    if root and not _has_runtime_headers(cpp_extension.CUDA_HOME):
        # cpp_extension finds the toolkit through its CUDA_HOME, which torch guesses as the folder
        # above the first ``nvcc`` on PATH without following wrappers: with a wrapper script in
        # /usr/local/bin (this build machine) it picked /usr/local, and bindings.cpp then failed
        # on a missing cuda_runtime.h. Give it the toolkit we found instead.
        cpp_extension.CUDA_HOME = root
    folder = cache_dir(archs)
    folder.mkdir(parents=True, exist_ok=True)
    src = source_dir()
    cpp_extension.load(
        name="attnkit_cuda_ext",
        sources=[str(src / s) for s in SOURCES],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=[*NVCC_FLAGS, *_arch_flags(archs)],
        extra_include_paths=[str(src)],
        build_directory=str(folder),
        is_python_module=False,  # the library registers torch.ops.attnkit_cuda.* when loaded
        verbose=verbose,
    )
    _register_fakes()
    return folder


def load() -> bool:
    """Build/load the extension once per process; ``True`` when ``torch.ops.attnkit_cuda`` works.

    The first failure is reported once with :mod:`warnings` (except when disabled on purpose by
    ``ATTNKIT_DISABLE_CUDA``) and remembered: later calls return ``False`` at no cost.
    """
    if _disabled():  # checked on every call: no warning, nothing cached
        _state["reason"] = f"{DISABLE_ENV}={os.environ[DISABLE_ENV]} is set"
        return False
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        reason = unavailable_reason()
        if reason is None:
            try:
                build()
            except Exception as exc:  # a compiler error, a missing library, ...
                reason = f"building it failed: {type(exc).__name__}: {str(exc).strip()[-600:]}"
        _state["ok"] = reason is None
        _state["reason"] = reason
        if reason:
            _warn_once(reason)
    return bool(_state["ok"])


def available() -> str | None:
    """``None`` when the extension is loaded (building it if needed), else the reason it is not."""
    return None if load() else str(_state.get("reason"))


def ops():
    """``torch.ops.attnkit_cuda`` (call :func:`load` first)."""
    return torch.ops.attnkit_cuda


# --------------------------------------------------------------------------------------------
# What the "cuda" backends of every op ask before they take a call
# --------------------------------------------------------------------------------------------

#: Why the CUDA backends step aside inside ``torch.compile``: their checks (building the extension
#: under a lock, K/V pointer alignment via ``data_ptr``) cannot be traced, and a graph break
#: would undo ``fullgraph=True``. The Triton kernels, which are traceable custom ops, take these
#: calls there; eager calls still reach the CUDA kernels.
COMPILING_REASON = (
    "inside torch.compile (the CUDA kernels' eager-only checks cannot be traced; the Triton "
    "kernels take the call)"
)


def extension_reason() -> str | None:
    """``None`` when the CUDA extension is loaded (building it on first use), else why not.
    Inside ``torch.compile`` always a reason (:data:`COMPILING_REASON`), without touching it."""
    if torch.compiler.is_compiling():
        return COMPILING_REASON
    reason = available()
    return None if reason is None else f"the CUDA extension is unavailable: {reason}"


def _reset_for_tests() -> None:
    _state.clear()


# --------------------------------------------------------------------------------------------
# Fake (meta) implementations: output shapes and dtypes only, for torch.compile / FakeTensor.
# --------------------------------------------------------------------------------------------


def fake_decode_attention(q, k, v, seqlens_k, key_padding_mask, scale, window_left, window_right,
                          num_splits):
    B, Hq, Nq, D = q.shape
    return q.new_empty((B, Hq, Nq, D)), q.new_empty((B, Hq, Nq), dtype=torch.float32)


def fake_linear_decode_step(q, k, v, s, z, feature_map, normalize, eps, scale):
    B, Hq, _ = q.shape
    return (q.new_empty((B, Hq, v.shape[-1])), s.new_empty(s.shape, dtype=torch.float32),
            z.new_empty(z.shape, dtype=torch.float32))


def fake_lora_shrink(x, lora_a, scalings, index):
    return x.new_empty((x.shape[0], lora_a.shape[1]), dtype=torch.float32)


def fake_lora_expand(base, lora_b, u, index):
    return base.new_empty(base.shape)


FAKES = {
    "decode_attention": fake_decode_attention,
    "linear_decode_step": fake_linear_decode_step,
    "lora_shrink": fake_lora_shrink,
    "lora_expand": fake_lora_expand,
}


def _register_fakes(namespace: str = "attnkit_cuda") -> None:
    """Register :data:`FAKES` for ``namespace`` (once; the ops must exist by then)."""
    key = f"fakes:{namespace}"
    if _state.get(key):
        return
    for name, fn in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fn)
    _state[key] = True


# --------------------------------------------------------------------------------------------
# python -m attnkit.kernels.cuda_ext
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attnkit.kernels.cuda_ext",
        description="Build (or show the state of) attnkit's CUDA extension.",
    )
    parser.add_argument("--build", action="store_true", help="compile now (reuses the cache)")
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability to build for, e.g. 90 (repeatable; default: the "
                        "visible GPUs)")
    parser.add_argument("--status", action="store_true", help="print why it can or cannot be used")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.build:
        t0 = time.perf_counter()
        try:
            folder = build(args.arch, verbose=args.verbose)
        except Exception as exc:
            print(f"build failed: {exc}", file=sys.stderr)
            return 1
        print(f"built in {time.perf_counter() - t0:.1f} s: {folder}")
        return 0
    reason = unavailable_reason(args.arch)
    print(f"source: {source_dir()}")
    print(f"cache:  {_cache_root()}")
    print(f"nvcc:   {find_nvcc()}")
    print("status: " + ("can be built and used" if reason is None else f"not usable: {reason}"))
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy, so the fakes are registered from
    # attnkit.kernels.cuda_ext (the module bindings.cpp names in set_python_module).
    from attnkit.kernels import cuda_ext as _module

    raise SystemExit(_module.main())
