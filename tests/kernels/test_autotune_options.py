"""What every autotuned attnkit kernel gets (:func:`attnkit.kernels.autotune.autotuned`): ints that
vary per batch are not specialised on, and autotune timings are cached where Triton can."""

from __future__ import annotations

import inspect

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from attnkit.kernels import autotune


def _kernel(X, sqb, sqh, NQ, NK, WIN_L, BLOCK: tl.constexpr):
    pass


def _jit():
    return JITFunction(_kernel)  # a real JITFunction even under TRITON_INTERPRET


def test_relax_specialization_marks_only_the_varying_runtime_ints():
    k = _jit()
    marked = autotune.relax_specialization(k, ("NQ", "NK", "WIN_L", "sqb", "BLOCK", "ABSENT"))
    assert marked == ["sqb", "NQ", "NK", "WIN_L"]  # BLOCK is a constexpr, ABSENT not a parameter
    flags = {p.name: p.do_not_specialize for p in k.params}
    assert flags == {"X": False, "sqb": True, "sqh": False, "NQ": True, "NK": True, "WIN_L": True,
                     "BLOCK": False}
    assert set(k.do_not_specialize) == set(marked)


def test_relax_specialization_leaves_launched_and_interpreted_kernels_alone():
    k = _jit()
    k.device_caches = {0: "a binder"}  # launched already: the flags would no longer be read
    assert autotune.relax_specialization(k) == []
    assert not any(p.do_not_specialize for p in k.params)
    assert autotune.relax_specialization(object()) == []


def test_autotuner_options_follow_the_signature(monkeypatch):
    has = "cache_results" in inspect.signature(triton.autotune).parameters  # triton >= 3.2
    expected = {"cache_results": True} if has else {}
    assert autotune.autotuner_options() == expected

    def old_autotune(configs, key, prune_configs_by=None):  # triton before cache_results
        raise AssertionError

    monkeypatch.setattr(triton, "autotune", old_autotune)
    assert autotune.autotuner_options() == {}


def test_autotuned_wraps_with_the_prune_and_relaxed_ints(monkeypatch):
    seen = {}

    def fake_autotune(configs, key, prune_configs_by=None, cache_results=False):
        seen.update(configs=configs, key=key, prune=prune_configs_by, cache=cache_results)
        return lambda fn: ("tuned", fn)

    monkeypatch.setattr(triton, "autotune", fake_autotune)
    monkeypatch.setenv(autotune.ENV, "0")
    k = _jit()
    assert autotune.autotuned(k, ["c1", "c2"], key=["NQ"]) == ("tuned", k)
    assert seen["cache"] is True and seen["key"] == ["NQ"]
    assert seen["prune"]["early_config_prune"](["c1", "c2"], {}) == ["c1"]  # ATTNKIT_AUTOTUNE=0
    assert "NQ" in k.do_not_specialize


def test_tile_pointer_strides_stay_specialised():
    """Relaxing the Q/K/V/O batch strides cost the sm_90 flash forward its cp.async pipeline and
    224-368 B of spills (their pointers lose the 16-byte alignment Triton proves from % 16)."""
    for name in ("sqb", "skb", "svb", "sob", "sqn", "skn", "svn", "son", "sdb", "sdqb", "sdkb",
                 "sdvb"):
        assert name not in autotune.VARYING_INTS
    assert {"NQ", "NK", "WIN_L", "WIN_R"} <= set(autotune.VARYING_INTS)
