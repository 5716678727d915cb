"""``lora_linear``'s measured choice between the fused kernel and the unfused cuBLAS path
(``attnkit/kernels/lora/path.py``): decided on CPU with an injected timer, cached on a tmp_path,
forced by ``ATTNKIT_LORA_PATH``. No timing is asserted: the timers are fakes."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from attnkit.finetune import lora_linear
from attnkit.kernels.lora import backends, path
from attnkit.kernels.lora.backends import LoRACall, linear_backend
from attnkit.kernels.lora.naive import lora_linear_naive


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNKIT_LORA_PATH", raising=False)
    monkeypatch.delenv("ATTNKIT_BACKEND", raising=False)
    monkeypatch.setattr(path, "CACHE", path.PathCache())
    monkeypatch.setattr(path, "_said", set())


def _call(t=17, n_in=40, n_out=24, r=4, grad=False, bias=True, p=0.0):
    x = torch.randn(t, n_in)
    w = torch.randn(n_out, n_in) / math.sqrt(n_in)
    a = torch.randn(r, n_in) / math.sqrt(n_in)
    b = torch.randn(n_out, r) / math.sqrt(r)
    return LoRACall(x=x, rank=r, needs_grad=grad, batched=False, weight=w,
                    bias=torch.randn(n_out) if bias else None, lora_a=a, lora_b=b, scaling=0.5,
                    dropout_p=p)


class FakeTimer:
    """Milliseconds per path from a table; runs each closure once so that both paths really run,
    and keeps what they returned."""

    def __init__(self, fused, cublas):
        self.ms = {"fused": fused, "cublas": cublas}
        self.calls: list[str] = []
        self.outputs: dict[str, torch.Tensor] = {}

    def __call__(self, which, fn):
        self.calls.append(which)
        self.outputs[which] = fn().detach()
        return self.ms[which]


@pytest.mark.parametrize("fused, cublas, want", [(1.0, 2.0, "fused"), (2.0, 1.0, "cublas"),
                                                 (1.0, 1.0, "cublas")])
def test_keeps_the_faster_and_fused_only_when_strictly_faster(fused, cublas, want):
    timer = FakeTimer(fused, cublas)
    assert path.choose_path(_call(), timer=timer, device_name="FakeGPU") == want
    assert sorted(timer.calls) == ["cublas", "fused"]


@pytest.mark.parametrize("grad", [False, True], ids=["infer", "train"])
def test_both_timed_paths_compute_the_layer(grad):
    """The closures run the real ops (the fused one in the interpreter here), forward and, for a
    training call, backward too: both return the layer's output, and the two agree."""
    timer = FakeTimer(1.0, 2.0)
    call = _call(grad=grad)
    path.choose_path(call, timer=timer, device_name="FakeGPU")
    y_fused, y_cublas = timer.outputs["fused"], timer.outputs["cublas"]
    assert y_fused.shape == y_cublas.shape == (17, 24)
    torch.testing.assert_close(y_fused, y_cublas, rtol=1e-4, atol=1e-4)


def test_decision_is_cached_in_memory_and_on_disk(tmp_path, caplog):
    call = _call()
    timer = FakeTimer(2.0, 1.0)
    with caplog.at_level(logging.INFO, logger="attnkit.lora"):
        assert path.choose_path(call, timer=timer, device_name="FakeGPU") == "cublas"
        assert path.choose_path(call, timer=timer, device_name="FakeGPU") == "cublas"
    assert timer.calls == ["fused", "cublas"]  # measured once
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "cublas path" in said[0] and "fused 2.0000 ms" in said[0]
    file = tmp_path / "cache" / "lora_dispatch.json"
    assert path.cache_file() == file
    data = json.loads(file.read_text())
    key = path.dispatch_key(call, "FakeGPU")
    assert data[key] == {"path": "cublas", "fused_ms": 2.0, "cublas_ms": 1.0}
    # a new process (a fresh cache object) reads it back without timing
    fresh = path.PathCache()
    timer2 = FakeTimer(1.0, 2.0)
    assert path.choose_path(call, timer=timer2, cache=fresh, device_name="FakeGPU") == "cublas"
    assert timer2.calls == []


def test_key_buckets_tokens_and_rank_and_names_the_rest():
    key = lambda **kw: path.dispatch_key(_call(**kw), "H200")
    assert key(t=17) == key(t=30)  # one power-of-two bucket
    assert key(t=17) != key(t=40)
    assert key(r=3) == key(r=4) != key(r=5)
    assert key() != key(n_in=48)
    assert key() != key(grad=True)
    assert key() != key(bias=False)
    assert key() != key(p=0.1)
    assert key().startswith("H200|float32|infer|T32|in40|out24|r4|bias1|drop0|attnkit")


def test_a_corrupt_cache_file_is_measured_again(tmp_path):
    file = tmp_path / "cache" / "lora_dispatch.json"
    file.parent.mkdir()
    file.write_text("{not json")
    timer = FakeTimer(1.0, 2.0)
    assert path.choose_path(_call(), timer=timer, device_name="FakeGPU") == "fused"
    assert timer.calls and json.loads(file.read_text())


def test_an_unwritable_cache_keeps_the_choice_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = path.PathCache(blocker / "lora_dispatch.json")  # its parent is a file
    timer = FakeTimer(2.0, 1.0)
    with caplog.at_level(logging.WARNING, logger="attnkit.lora"):
        assert path.choose_path(_call(), timer=timer, cache=cache, device_name="G") == "cublas"
        assert path.choose_path(_call(), timer=timer, cache=cache, device_name="G") == "cublas"
        assert len(timer.calls) == 2  # the second call came from memory
        path.choose_path(_call(t=100), timer=timer, cache=cache, device_name="G")  # another key
    warned = [r for r in caplog.records if "could not write the dispatch cache" in r.getMessage()]
    assert len(warned) == 1 and str(blocker) in warned[0].getMessage()  # said once, with the path


def test_cpu_calls_are_never_timed():
    """No injected timer on CPU tensors: nothing to measure, nothing cached."""
    assert path.choose_path(_call()) == "fused"
    assert not path.cache_file().exists()


@pytest.mark.parametrize("value", ["fast", "triton", "1"])
def test_bad_env_value_names_it_and_the_accepted_ones(monkeypatch, value):
    monkeypatch.setenv("ATTNKIT_LORA_PATH", value)
    x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError) as info:
        lora_linear(x, w, a, b)
    msg = str(info.value)
    for word in ("ATTNKIT_LORA_PATH", repr(value), "'auto'", "'fused'", "'cublas'"):
        assert word in msg, (word, msg)


@pytest.mark.parametrize("value", ["", "auto", "AUTO", " fused ", "cublas"])
def test_env_values_accepted(monkeypatch, value):
    monkeypatch.setenv("ATTNKIT_LORA_PATH", value)
    assert path.path_setting() == (value.strip().lower() or "auto")


def test_env_forces_a_path_and_a_named_backend_wins(monkeypatch):
    call = _call()
    never = lambda c: pytest.fail("nothing is measured here")
    monkeypatch.setenv("ATTNKIT_LORA_PATH", "cublas")
    assert linear_backend(call, "auto", never).name == "torch"
    assert linear_backend(call, "triton", never).name == "triton"
    monkeypatch.setenv("ATTNKIT_LORA_PATH", "fused")  # CPU tensors: the interpreter
    assert linear_backend(call, "auto", never).name == "triton"
    assert linear_backend(call, "torch", never).name == "torch"
    rank_300 = _call(n_in=300, r=300)
    assert linear_backend(rank_300, "auto", never).name == "torch"  # fused cannot: auto's rule
    monkeypatch.setenv("ATTNKIT_LORA_PATH", "auto")
    assert linear_backend(call, "auto", never).name == "torch"  # CPU under auto: torch, untimed


@pytest.mark.parametrize("choice, want", [("fused", "triton"), ("cublas", "torch")])
def test_auto_follows_the_measurement_where_triton_is_eligible(monkeypatch, choice, want):
    """Where auto's rule gives Triton (a CUDA call), the measured choice decides."""
    monkeypatch.setattr(backends, "select_lora_backend", lambda call, name, op: backends._TRITON)
    seen = []
    got = linear_backend(_call(), "auto", lambda c: seen.append(c) or choice)
    assert got.name == want and len(seen) == 1


@pytest.mark.parametrize("env", ["fused", "cublas"])
def test_lora_linear_matches_oracle_on_either_forced_path(monkeypatch, env):
    monkeypatch.setenv("ATTNKIT_LORA_PATH", env)
    call = _call()
    x = call.x.clone().requires_grad_()
    a = call.lora_a.clone().requires_grad_()
    y = lora_linear(x, call.weight, a, call.lora_b, 0.5, call.bias)
    want = lora_linear_naive(x.detach(), call.weight, call.lora_a, call.lora_b, 0.5, call.bias)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert x.grad is not None and a.grad is not None


@pytest.mark.parametrize("env, want", [("fused", "triton"), ("cublas", "torch"), ("auto", "torch")])
def test_torch_compile_fullgraph_under_auto(monkeypatch, env, want):
    """The path choice traces without a graph break (CPU: auto is torch, fused the interpreter)."""
    monkeypatch.setenv("ATTNKIT_LORA_PATH", env)
    ran = []
    for cls in (backends.TritonLoRA, backends.TorchLoRA):
        original = cls.run
        monkeypatch.setattr(cls, "run", lambda self, call, _o=original: ran.append(self.name)
                            or _o(self, call))
    call = _call()
    a = call.lora_a.clone().requires_grad_()
    fn = lambda x, a: lora_linear(x, call.weight, a, call.lora_b, 0.5, call.bias)
    y = torch.compile(fn, backend="aot_eager", fullgraph=True)(call.x, a)
    y.square().sum().backward()
    assert set(ran) == {want} and torch.isfinite(a.grad).all()
    want_y = lora_linear_naive(call.x, call.weight, call.lora_a, call.lora_b, 0.5, call.bias)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-4, atol=1e-4)


def test_timed_paths_with_dropout_run_forward_and_backward():
    """Dropout masks differ between the paths by design (Philox vs torch RNG), so only the shape
    and finiteness are compared; the dropout-free tests above compare values."""
    timer = FakeTimer(1.0, 2.0)
    path.choose_path(_call(grad=True, p=0.3), timer=timer, device_name="FakeGPU")
    for y in timer.outputs.values():
        assert y.shape == (17, 24) and torch.isfinite(y).all()
