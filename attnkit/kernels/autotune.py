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

__all__ = ["ENV", "first_only_if_asked"]

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
