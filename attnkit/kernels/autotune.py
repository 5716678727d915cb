"""``ATTNKIT_AUTOTUNE=0``: offer each autotuned kernel only its first fitting config.

Every autotuned launch in attnkit prunes its configs through :func:`first_only_if_asked`. Unset
(or ``1``), the autotuner benchmarks every config the prune keeps, once per key. ``0`` keeps only
the first one, the tile the ahead-of-time compile tests check for registers and spills, so no
alternative is benchmarked. That is for short GPU test runs (``attnkit bench --gpu-check`` sets it
for its test suite): a suite touches dozens of autotune keys, each costing a compile and a
benchmark per config in every pytest-xdist worker. Timings should keep autotuning on.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["ENV", "first_only_if_asked", "VARYING_INTS", "relax_specialization", "autotuner_options",
           "autotuned"]

ENV = "ATTNKIT_AUTOTUNE"


def first_only_if_asked(prune: Callable | None = None) -> Callable:
    """Wrap an ``early_config_prune`` (``None``: keep all) so that ``ATTNKIT_AUTOTUNE=0`` keeps
    only the first config it returns. The variable is read at each prune (once per key)."""

    def pruned(configs, named_args, **kwargs):
        kept = list(prune(configs, named_args, **kwargs)) if prune is not None else list(configs)
        if os.environ.get(ENV, "1").strip() == "0":
            return kept[:1]
        return kept

    return pruned


#: Integer kernel parameters whose values change from batch to batch (lengths, packed totals,
#: block-list sizes; the LSE's and the key mask's batch strides, ``H * N`` and ``Nk``) or per
#: model (window sizes). Triton specialises an int argument on ``== 1`` and ``% 16 == 0`` by
#: default, so each new combination is another compile (2-10 s for the flash kernels); these are
#: passed plainly. The Q/K/V/O batch strides are not listed: relaxing them too cost the sm_90
#: dense forward 224 B of spills (255 registers; their pointers lose the 16-byte alignment that
#: vectorised tile loads need), and with D % 16 == 0 they do not vary in class anyway.
#: Names a kernel does not have are ignored.
VARYING_INTS = ("NQ", "NK", "N", "WIN_L", "WIN_R", "NROWB", "MAXK", "NCOLB", "MAXQ", "slb", "smb")


def relax_specialization(kernel, names=VARYING_INTS) -> list[str]:
    """Mark ``kernel``'s (a ``triton.jit`` function's) parameters ``names`` do-not-specialize, as
    ``@triton.jit(do_not_specialize=...)`` would; returns the names it marked.

    Must run before the kernel's first launch (Triton builds its argument binder then, from
    each parameter's flag); the same ``KernelParam.do_not_specialize`` flag exists on triton 3.6
    and 3.9. A kernel without it (the interpreter's ``InterpretedFunction``) is left alone."""
    params = getattr(kernel, "params", None)
    caches = getattr(kernel, "device_caches", None)
    if params is None or (isinstance(caches, dict) and caches):
        return []  # not a JITFunction, or already launched (its binder is built)
    marked = []
    for p in params:
        if p.name in names and not getattr(p, "is_constexpr", False) and hasattr(p, "do_not_specialize"):
            p.do_not_specialize = True
            marked.append(p.name)
    if marked:
        kernel.do_not_specialize = [*(kernel.do_not_specialize or []), *marked]
    return marked


def autotuner_options() -> dict:
    """Keyword arguments for ``triton.autotune`` that this Triton has: ``cache_results=True``
    (triton >= 3.2: timings are kept on disk, keyed by the kernel, the tuning key and the configs
    offered, so a new process or a pytest-xdist worker does not benchmark a key again)."""
    import inspect

    import triton

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


def autotuned(kernel, configs, key, prune: Callable | None = None, names=VARYING_INTS, **extra):
    """``triton.autotune`` of ``kernel`` as every attnkit kernel gets it: the prune through
    :func:`first_only_if_asked`, :func:`autotuner_options`, and :func:`relax_specialization` on
    the varying ints; ``extra``: more ``triton.autotune`` arguments (``restore_value``)."""
    import triton

    relax_specialization(kernel, names)
    return triton.autotune(configs, key=key,
                           prune_configs_by={"early_config_prune": first_only_if_asked(prune)},
                           **autotuner_options(), **extra)(kernel)
