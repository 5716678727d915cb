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

A model that does not route its attention through the interface (Falcon: it calls torch's SDPA
itself, with the mask transformers' mask function built) keeps the real ``"sdpa"`` mask function:
under attnkit a user gets a clear refusal from ``swap_attention`` for such a model, and under
``"sdpa"`` the real mask, so replacing its mask too made 37 Falcon tests fail that no user could
see fail. Whether a model routes is read from its modeling module (the test for it:
``attnkit.attn.hf.surgery.routes_through_interface``, on a model instance; here, on the module of
the config's model, since the mask function gets only the config).

The plugin also runs the attnkit of an older tree (``--pythonpath`` putting that tree first):
before the ``attnkit/attn/hf/`` package split (commit 731f44b^ and earlier) the functions lived in
one module ``attnkit/attn/hf.py``, and the hand-off to the real SDPA (``_sdpa_fallback``) is
counted wherever it is defined.

With ``ATTNKIT_SUITE_COUNTS=FILE`` set, the number of attention calls that attnkit computed
itself and the number it handed on (dense 4-D masks, eager for ``output_attentions``) are
written to FILE as JSON at the end of the session, to show that attnkit really ran.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections import Counter

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import attnkit.attn.hf as akhf

try:  # the package layout (attnkit/attn/hf/interface.py)
    _iface = importlib.import_module("attnkit.attn.hf.interface")
except ImportError:  # an older tree: attnkit/attn/hf.py holds everything
    _iface = akhf

COUNTS: Counter = Counter()
#: transformers' own "sdpa" mask function, taken before attnkit's replaces it.
_REAL_SDPA_MASK = AttentionMaskInterface._global_mapping["sdpa"]
_ROUTES: dict[type, bool] = {}


def _config_routes(config) -> bool:
    """Whether the model of ``config`` looks its attention up in ``ALL_ATTENTION_FUNCTIONS``
    (its ``modeling_*`` module, next to the config's ``configuration_*`` module, imports it or
    declares ``_supports_attention_backend = True`` on a class). Unknown layouts count as routing,
    so attnkit runs there as before."""
    cls = type(config)
    if cls not in _ROUTES:
        name = cls.__module__.replace(".configuration_", ".modeling_")
        try:
            module = sys.modules.get(name) or importlib.import_module(name)
        except ImportError:
            module = None
        if module is None or name == cls.__module__:
            _ROUTES[cls] = True
        else:
            members = vars(module)
            _ROUTES[cls] = "ALL_ATTENTION_FUNCTIONS" in members or any(
                isinstance(obj, type) and obj.__dict__.get("_supports_attention_backend") is True
                for obj in members.values())
    return _ROUTES[cls]


def _count(name: str) -> None:
    # not while torch.compile traces: dynamo would guard on the counter's value and recompile
    # the model at every call (the counts then cover the eager calls only)
    if not torch.compiler.is_compiling():
        COUNTS[name] += 1


def _counted(name, fn):
    def wrapper(*args, **kwargs):
        _count(name)
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", name)
    wrapper.__wrapped__ = fn
    return wrapper


def _install() -> None:
    # count the hand-offs where they happen (the module-level names the interface calls)
    _iface._sdpa_fallback = _counted("handed_to_sdpa", _iface._sdpa_fallback)

    def attention(*args, **kwargs):
        _count("calls")
        return akhf.attnkit_attention_forward(*args, **kwargs)

    def mask(*args, config=None, **kwargs):
        if config is not None and not _config_routes(config):
            _count("masks_left_to_sdpa")
            return _REAL_SDPA_MASK(*args, config=config, **kwargs)
        return akhf.attnkit_mask(*args, config=config, **kwargs)

    AttentionInterface.register("sdpa", attention)
    AttentionMaskInterface.register("sdpa", mask)


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
