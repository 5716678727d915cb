"""pytest plugin: attnkit stands in for transformers' ``"sdpa"`` for a whole test session.

Loaded by ``scripts/hf_model_tests.py`` as ``-p hf_suite_plugin`` (with ``scripts/`` on
``PYTHONPATH``) for the attnkit half of the run. At import it registers attnkit's attention
function and mask function under the name ``"sdpa"`` in transformers' global
``AttentionInterface`` / ``AttentionMaskInterface`` mappings, so every model that would run
PyTorch's SDPA (the default implementation, and ``attn_implementation="sdpa"``) runs attnkit
instead, with no change to the tests. attnkit's own fallbacks call transformers' sdpa functions
by import, not through the registry, so they still reach the real SDPA.

With ``ATTNKIT_SUITE_CLAIM_SDPA=module[,module]`` every model class in those modules declares
SDPA support (``_supports_sdpa = True``): gpt-oss declines SDPA because SDPA has no attention
sinks, so without this its tests would quietly run eager and never reach attnkit, which has them.

With ``ATTNKIT_SUITE_COUNTS=FILE`` set, the number of attention calls that attnkit computed
itself and the number it handed on (dense 4-D masks, eager for ``output_attentions``) are
written to FILE as JSON at the end of the session, to show that attnkit really ran.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import attnkit.attn.hf as akhf
from attnkit.attn.hf import interface as _iface

COUNTS: Counter = Counter()


def _counted(name, fn):
    def wrapper(*args, **kwargs):
        COUNTS[name] += 1
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", name)
    wrapper.__wrapped__ = fn
    return wrapper


def _install() -> None:
    # count the hand-offs where they happen (the module-level names the interface calls)
    _iface._sdpa_fallback = _counted("handed_to_sdpa", _iface._sdpa_fallback)

    def attention(*args, **kwargs):
        COUNTS["calls"] += 1
        return akhf.attnkit_attention_forward(*args, **kwargs)

    AttentionInterface.register("sdpa", attention)
    AttentionMaskInterface.register("sdpa", akhf.attnkit_mask)


def _claim_sdpa() -> None:
    import importlib

    from transformers import PreTrainedModel

    for name in filter(None, os.environ.get("ATTNKIT_SUITE_CLAIM_SDPA", "").split(",")):
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, PreTrainedModel):
                obj._supports_sdpa = True


_install()
_claim_sdpa()


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("ATTNKIT_SUITE_COUNTS")
    if path:
        with open(path, "w") as f:
            json.dump(dict(COUNTS), f)
