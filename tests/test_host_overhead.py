"""``attnkit bench --host-overhead``: the stubbed-launch host benchmark runs and reports every layer
(in a subprocess: it needs TRITON_INTERPRET unset, which this test session sets). No timing is
asserted; figures belong in benchmarks/NOTES.md."""

from __future__ import annotations

import pytest

from attnkit.bench.host_overhead import format_report, time_call
from tests.harness import run_json_script

SCRIPT = r"""
import json, torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from attnkit.bench.host_overhead import measure, stubbed_launches
from attnkit.kernels import dispatch
saved = (JITFunction.run, Autotuner.run, dispatch.tensor_device_reason)
r = measure(shape=(1, 2, 16, 16), dtype=torch.float32, calls=3, repeats=1)
r["restored"] = saved == (JITFunction.run, Autotuner.run, dispatch.tensor_device_reason)
print(json.dumps(r))
"""


@pytest.fixture(scope="module")
def result():
    return run_json_script(SCRIPT, timeout=300)


def test_every_layer_is_timed_and_the_stubs_are_removed(result):
    assert result["restored"]
    for mode in ("train", "no_grad"):
        layers = result["modes"][mode]
        for name in ("attention", "plan_key", "bind", "dispatch", "flash_attention",
                     "plan.forward", "autograd", "other", "validate", "select_backend",
                     "FlashArgs", "FlashPlan", "_Launch", "_fwd_impl", "uncached", "custom_op"):
            assert name in layers, (mode, name)
        assert layers["attention"] > 0 and layers["_Launch"] > 0
    assert result["modes"]["train_fwd_bwd"]["attention+backward"] > 0
    text = format_report(result)
    assert "validate" in text and "target" in text


def test_time_call_takes_the_median_of_repeats():
    ticks = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0])  # repeats of 1 s, 3 s and 2 s for 1 call each
    calls = []
    us = time_call(lambda: calls.append(1), calls=1, repeats=3, clock=lambda: next(ticks))
    assert us == pytest.approx(2e6) and len(calls) == 1 + 3


def test_refused_under_the_interpreter(monkeypatch):
    from attnkit.bench.host_overhead import stubbed_launches

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"), stubbed_launches():
        pass
