"""CPU tests of the CUDA backend's declarations and of the extension loader (no GPU needed).

What the ``"cuda"`` backends refuse and why, ``ATTNKIT_DISABLE_CUDA``, the one-time fallback
warning, the cache folder, and the fake implementations torch.compile traces with (checked
against the schemas ``bindings.cpp`` declares).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from attnkit import Causal, Dense, SlidingWindow
from attnkit.attn.inputs import validate
from attnkit.kernels import cuda_ext
from attnkit.kernels.dispatch import select_backend
from attnkit.kernels.flash import cuda as cb
from attnkit.kernels.flash.backends import BACKENDS
from attnkit.kernels.linear.cuda import linear_step_reasons
from attnkit.kernels.lora.backends import LoRACall
from attnkit.kernels.lora.cuda import CudaLoRA


@pytest.fixture(autouse=True)
def _fresh_loader(monkeypatch):
    monkeypatch.delenv(cuda_ext.DISABLE_ENV, raising=False)
    cuda_ext._reset_for_tests()
    yield
    cuda_ext._reset_for_tests()


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if anything tries to build the extension."""

    def boom(*a, **k):
        raise AssertionError("the extension must not be built for a call the backend rejects")

    monkeypatch.setattr(cuda_ext, "build", boom)
    monkeypatch.setattr(cuda_ext, "available", boom)


def _call(B=2, Hq=4, Hkv=2, Nq=1, Nk=37, D=64, dtype=torch.float16, pattern=None, grad=False, **kw):
    q = torch.randn(B, Hq, Nq, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, Hkv, Nk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, D, dtype=dtype)
    return validate(q, k, v, pattern, None, kw.get("kpm"), kw.get("cu"), None, False)


def _reasons(call) -> str:
    return " | ".join(cb.CudaDecodeBackend().not_supported_reasons(call))


# --------------------------------------------------------------------------------------------
# What the decode backend refuses
# --------------------------------------------------------------------------------------------


def test_cpu_tensors_rejected_without_building(no_build):
    assert "need CUDA tensors" in _reasons(_call())


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"dtype": torch.float32}, "dtype torch.float32 is not supported"),
        ({"D": 80}, "head dim 80 is not supported (64, 128, 256 are)"),
        ({"Nq": 17, "Nk": 40}, "17 query tokens per sequence is not decoding"),
        ({"grad": True}, "no backward"),
    ],
    ids=["fp32", "D80", "Nq17", "grad"],
)
def test_decode_reasons(no_build, kwargs, expected):
    assert expected in _reasons(_call(**kwargs))


def test_batch_above_the_grid_limit_rejected(no_build):
    q = torch.empty(65536, 1, 1, 64, dtype=torch.float16, device="meta")
    k = torch.empty(65536, 1, 8, 64, dtype=torch.float16, device="meta")
    call = validate(q, k, k, None, None, None, None, None, False)
    assert "batch size 65536 is above the CUDA grid limit of 65535" in _reasons(call)


def test_packed_sequences_rejected(no_build):
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    q = torch.randn(1, 4, 2, 64, dtype=torch.float16)
    kv = torch.randn(1, 2, 2, 64, dtype=torch.float16)
    call = validate(q, kv, kv, None, None, None, cu, None, False)
    assert "cu_seqlens" in _reasons(call)


def test_block_sparse_spec_rejected(no_build):
    from attnkit import BlockSparse

    sparse = BlockSparse(torch.ones(1, 1, 3, dtype=torch.bool), 16)
    assert "block_sparse patterns are not supported (band are)" in _reasons(_call(pattern=sparse))


@pytest.mark.parametrize("pattern", [Dense(), Causal(), SlidingWindow(8), SlidingWindow(3, 2)], ids=str)
def test_supported_call_only_waits_on_the_extension(monkeypatch, pattern):
    """A decode call that fits is refused only because of the device / extension."""
    monkeypatch.setattr(cb.CudaDecodeBackend, "device_reason", lambda self, t: None)  # "on a GPU"
    monkeypatch.setattr(cuda_ext, "available", lambda: "no CUDA GPU is available")
    kpm = torch.ones(2, 37, dtype=torch.bool)
    for call in (_call(pattern=pattern), _call(pattern=pattern, kpm=kpm), _call(D=128, Nq=16, Nk=40),
                 _call(D=256, dtype=torch.bfloat16, Hq=32, Hkv=1)):
        assert cb.CudaDecodeBackend().not_supported_reasons(call) == [
            "the CUDA extension is unavailable: no CUDA GPU is available"
        ]


def test_misaligned_cache_rejected(monkeypatch, no_build):
    monkeypatch.setattr(cb.CudaDecodeBackend, "device_reason", lambda self, t: None)
    q = torch.randn(1, 2, 1, 64, dtype=torch.float16)
    big = torch.randn(1, 2, 10, 65, dtype=torch.float16)
    k = big[..., 1:]  # row stride 65: not a multiple of 8 elements
    call = validate(q, k, k.contiguous(), None, None, None, None, None, False)
    assert "k is not 16-byte aligned" in _reasons(call)


def test_cuda_backends_step_aside_inside_torch_compile(monkeypatch, no_build):
    """Inside torch.compile the CUDA backends refuse before data_ptr() or the extension build
    (neither can be traced): ``no_build`` fails the test if the loader is reached, and a
    misaligned cache must not even be looked at."""
    import attnkit.kernels.linear.cuda as lc

    monkeypatch.setattr(cb.CudaDecodeBackend, "device_reason", lambda self, t: None)
    monkeypatch.setattr(CudaLoRA, "device_reason", lambda self, t: None)
    monkeypatch.setattr(lc, "_device_reason", lambda t: None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def no_pointer(*a):
        raise AssertionError("data_ptr() is not traceable")

    monkeypatch.setattr(cb, "_kv_layout_reasons", no_pointer)
    assert cb.CudaDecodeBackend().not_supported_reasons(_call()) == [cb.COMPILING_REASON]
    q, k, v = torch.randn(2, 4, 64), torch.randn(2, 2, 64), torch.randn(2, 2, 32)
    assert linear_step_reasons(q, k, v, "elu1") == [cb.COMPILING_REASON]
    call = LoRACall(x=torch.randn(8, 64, dtype=torch.float16), rank=8, needs_grad=False, batched=True)
    assert CudaLoRA().not_supported_reasons(call) == [cb.COMPILING_REASON]


def test_explicit_cuda_backend_explains_every_reason(no_build):
    call = _call(D=80, dtype=torch.float32)
    with pytest.raises(ValueError, match="the 'cuda' backend cannot run this attention call") as e:
        select_backend(call, "cuda", BACKENDS, "attention")
    msg = str(e.value)
    assert "need CUDA tensors" in msg and "head dim 80" in msg and "float32" in msg


def test_auto_skips_cuda_on_cpu(no_build):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = select_backend(_call(), "auto", BACKENDS, "attention")
    assert chosen.name == "torch"


# --------------------------------------------------------------------------------------------
# Linear step and LoRA declarations
# --------------------------------------------------------------------------------------------


def test_linear_step_reasons(no_build):
    q = torch.randn(2, 4, 64)
    k, v = torch.randn(2, 2, 64), torch.randn(2, 2, 30)
    r = " | ".join(linear_step_reasons(q, k, v, lambda x: x))
    assert "need CUDA tensors" in r and "built-in feature maps" in r and "Dv = 30" in r
    r = " | ".join(linear_step_reasons(q.double(), k.double(), v.double(), "elu1"))
    assert "torch.float64 is not supported" in r
    with torch.enable_grad():
        r = " | ".join(linear_step_reasons(q.requires_grad_(), k, torch.randn(2, 2, 32), "relu"))
    assert "no backward" in r


def test_lora_reasons(no_build):
    x = torch.randn(300, 64, dtype=torch.float16)
    call = LoRACall(x=x, rank=600, needs_grad=True, batched=False)
    r = " | ".join(CudaLoRA().not_supported_reasons(call))
    for part in ("only lora_batched", "need CUDA tensors", "rank 600", "300 rows", "no backward"):
        assert part in r


# --------------------------------------------------------------------------------------------
# Loader: disable switch, one-time fallback message, cache folder
# --------------------------------------------------------------------------------------------


def test_disable_env(monkeypatch):
    monkeypatch.setenv(cuda_ext.DISABLE_ENV, "1")
    assert "ATTNKIT_DISABLE_CUDA=1 is set" in cuda_ext.unavailable_reason()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disabled on purpose: no warning
        assert cuda_ext.load() is False
    assert "ATTNKIT_DISABLE_CUDA" in cuda_ext.available()
    monkeypatch.setenv(cuda_ext.DISABLE_ENV, "0")
    assert "ATTNKIT_DISABLE_CUDA" not in (cuda_ext.unavailable_reason() or "")


def test_fallback_warns_once_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build of torch ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ... on a machine without GPU
    with pytest.warns(UserWarning, match=r"CUDA kernels are not used \(no CUDA GPU is available\); "
                                         "falling back to the Triton/torch kernels"):
        assert cuda_ext.load() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda_ext.load() is False  # remembered, not repeated
    assert cuda_ext.available() == "no CUDA GPU is available"


def test_cpu_torch_build_reason():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    assert "has no CUDA support" in cuda_ext.unavailable_reason()


def test_missing_toolkit_and_failed_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_ext, "_device_archs", lambda: [90])
    monkeypatch.setattr(cuda_ext, "find_nvcc", lambda: None)
    assert "no CUDA toolkit found" in cuda_ext.unavailable_reason()
    old = [75]
    monkeypatch.setattr(cuda_ext, "_device_archs", lambda: old)
    assert "compute capability 8.0 or newer, found sm_75" in cuda_ext.unavailable_reason()

    monkeypatch.setattr(cuda_ext, "unavailable_reason", lambda archs=None: None)

    def failing_build(*a, **k):
        raise RuntimeError("Error building extension 'attnkit_cuda_ext': nvcc exploded")

    monkeypatch.setattr(cuda_ext, "build", failing_build)
    with pytest.warns(UserWarning, match="building it failed: RuntimeError: .*nvcc exploded"):
        assert cuda_ext.load() is False


@pytest.mark.parametrize("torch_guess_has_headers", [False, True])
def test_build_hands_cpp_extension_a_toolkit_with_headers(monkeypatch, tmp_path,
                                                          torch_guess_has_headers):
    """torch guesses CUDA_HOME as the folder above the first nvcc on PATH; a wrapper script in
    /usr/local/bin made that /usr/local (no cuda_runtime.h) and the build failed. build() then
    uses the toolkit it found; a guess that has the headers is left alone."""
    from torch.utils import cpp_extension

    found = tmp_path / "cuda"
    guess = tmp_path / "guess"
    for root, headers in ((found, True), (guess, torch_guess_has_headers)):
        (root / "include").mkdir(parents=True)
        if headers:
            (root / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setattr(cuda_ext, "unavailable_reason", lambda archs=None: None)
    monkeypatch.setattr(cuda_ext, "cuda_home", lambda: str(found))
    monkeypatch.setattr(cuda_ext, "_register_fakes", lambda: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(guess))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.update(home=cpp_extension.CUDA_HOME))
    cuda_ext.build([90])
    assert seen["home"] == str(guess if torch_guess_has_headers else found)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    a = cuda_ext.cache_dir([90])
    assert a.parent == tmp_path / "xdg" / "attnkit" / "cuda_ext"
    assert cuda_ext.cache_dir([80]) != a and cuda_ext.cache_dir([90]) == a
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert cuda_ext.cache_dir([90]).parent == tmp_path / "ext" / "attnkit_cuda"


def test_cli_status(capsys):
    assert cuda_ext.main(["--status"]) == 0
    out = capsys.readouterr().out
    assert "source:" in out and "status:" in out


def test_cli_build_reports_failure(capsys, monkeypatch):
    monkeypatch.setenv(cuda_ext.DISABLE_ENV, "1")
    assert cuda_ext.main(["--build", "--arch", "90"]) == 1
    assert "ATTNKIT_DISABLE_CUDA" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Fake implementations against the schemas of bindings.cpp
# --------------------------------------------------------------------------------------------


def _schemas() -> dict[str, str]:
    text = (cuda_ext.source_dir() / "bindings.cpp").read_text()
    out = {}
    for m in re.finditer(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text):
        schema = "".join(re.findall(r"\"([^\"]*)\"", m.group(1)))
        out[schema.split("(")[0]] = schema
    return out


def test_fakes_match_schemas():
    schemas = _schemas()
    assert set(schemas) == set(cuda_ext.FAKES)
    ns = "attnkit_cuda_faketest"
    lib = torch.library.Library(ns, "DEF")  # noqa: F841 - keeps the definitions alive
    for schema in schemas.values():
        lib.define(schema)
    for name, fn in cuda_ext.FAKES.items():
        torch.library.register_fake(f"{ns}::{name}", fn, lib=lib)
    ops = getattr(torch.ops, ns)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 3, 128, dtype=torch.bfloat16)
        kv = torch.empty(2, 2, 1000, 128, dtype=torch.bfloat16)
        o, lse = ops.decode_attention(q, kv, kv, None, None, 0.1, -1, 0, 0)
        assert o.shape == q.shape and o.dtype == q.dtype
        assert lse.shape == (2, 8, 3) and lse.dtype == torch.float32

        ql, kl, vl = torch.empty(4, 8, 64), torch.empty(4, 2, 64), torch.empty(4, 2, 32)
        s, z = torch.empty(4, 2, 64, 32), torch.empty(4, 2, 64)
        o, s2, z2 = ops.linear_decode_step(ql, kl, vl, s, z, 1, True, 1e-6, 1.0)
        assert o.shape == (4, 8, 32) and s2.shape == s.shape and z2.shape == z.shape

        x = torch.empty(5, 64, dtype=torch.float16)
        u = ops.lora_shrink(x, torch.empty(3, 16, 64, dtype=torch.float16), torch.empty(3),
                            torch.empty(5, dtype=torch.int64))
        assert u.shape == (5, 16) and u.dtype == torch.float32
        y = ops.lora_expand(torch.empty(5, 96, dtype=torch.float16),
                            torch.empty(3, 96, 16, dtype=torch.float16), u, torch.empty(5, dtype=torch.int64))
        assert y.shape == (5, 96) and y.dtype == torch.float16
