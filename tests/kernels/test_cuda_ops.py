"""GPU tests of the CUDA ops against the torch reference and a float64 oracle.

Skipped (with the reason) without a GPU or when the extension cannot be built. Outputs are
poisoned: the caching allocator is filled with NaN first, so an element the kernel forgets to
write shows up. Odd lengths, GQA, several splits, padding, cache lengths of 0, 1 and 100k.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import Causal, Dense, SlidingWindow
from attnkit.kernels.flash.naive import attention_naive as attention_oracle
from attnkit.kernels.flash.torch_band import attention_torch
from tests.harness import max_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def ext():
    from attnkit.kernels import cuda_ext

    reason = cuda_ext.available()
    if reason:
        pytest.skip(f"the CUDA extension is unavailable: {reason}")
    return torch.ops.attnkit_cuda


def poison():
    """Leave NaN in the allocator's free blocks (large and small pools) for the next outputs."""
    big = torch.full((1 << 26,), float("nan"), device="cuda")
    small = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(32)]
    del big, small


def _pattern_id(p):
    return f"{p.kind}{'' if p.left is None else p.left}-{'' if p.right is None else p.right}"


# --------------------------------------------------------------------------------------------
# Decode attention
# --------------------------------------------------------------------------------------------

SHAPES = [  # B, Hq, Hkv, Nq, Nk
    (1, 1, 1, 1, 1),      # a cache of one token
    (3, 8, 2, 1, 113),    # GQA 4, odd length
    (2, 32, 8, 1, 1000),  # Llama-like grouping
    (2, 4, 4, 3, 257),    # MHA, three new tokens
    (2, 64, 4, 2, 77),    # 32 rows per KV head: several row groups
    (1, 6, 3, 5, 4),      # Nq > Nk: causal rows that see nothing
]
PATTERNS = [Dense(), Causal(), SlidingWindow(16), SlidingWindow(5, 3)]


def _check_decode(ext, q, k, v, pattern, kpm=None, splits=0, atol=2e-3):
    scale = q.shape[-1] ** -0.5
    wl, wr = pattern.window()
    poison()
    o, lse = ext.decode_attention(q, k, v, None, kpm, scale, wl, wr, splits)
    oo, olse = attention_oracle(q, k, v, pattern, scale, kpm)
    ro, _ = attention_torch(q, k, v, pattern, scale, kpm, None, None)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert max_err(o, oo) <= 2 * max_err(ro, oo) + atol
    assert max_err(lse, olse) <= 1e-3
    return o, lse


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 128, 256], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("pattern", PATTERNS, ids=_pattern_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-Nq{}-Nk{}".format(*s))
def test_decode_matches_oracle(ext, shape, pattern, D, dtype):
    B, Hq, Hkv, Nq, Nk = shape
    q = torch.randn(B, Hq, Nq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=dtype)
    _check_decode(ext, q, k, v, pattern)


@pytest.mark.parametrize("splits", [1, 2, 7, 128])
def test_decode_splits(ext, splits):
    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 999, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    _check_decode(ext, q, k, v, Dense(), splits=splits)
    _check_decode(ext, q, k, v, SlidingWindow(100), splits=splits)


def test_decode_key_padding_mask(ext):
    B, Nk = 4, 300
    q = torch.randn(B, 8, 2, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(B, 2, Nk, 64, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    kpm = torch.rand(B, Nk, device="cuda") > 0.3
    kpm[1] = False  # a sequence with no visible key: o = 0, lse = -inf
    kpm[2, :200] = False  # left padding
    o, lse = _check_decode(ext, q, k, v, Causal(), kpm=kpm, splits=3)
    assert (o[1] == 0).all() and torch.isinf(lse[1]).all()


def test_decode_cache_seqlens_ignores_unused_slots(ext):
    """Per-sequence lengths: slots past the length hold NaN and must never be read."""
    B, Nmax, D = 4, 300, 128
    lens = [0, 1, 150, 300]
    q = torch.randn(B, 8, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 2, Nmax, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for b, n in enumerate(lens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    seq = torch.tensor(lens, device="cuda", dtype=torch.int32)
    for pattern in (Dense(), SlidingWindow(31)):
        wl, wr = pattern.window()
        poison()
        o, lse = ext.decode_attention(q, k, v, seq, None, D**-0.5, wl, wr, 0)
        for b, n in enumerate(lens):
            oo, olse = attention_oracle(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], pattern)
            assert max_err(o[b : b + 1], oo) <= 2e-2, (b, n)
            assert max_err(lse[b : b + 1], olse) <= 1e-3, (b, n)


def test_decode_strided_cache(ext):
    """A ``[B, N, H, D]`` cache viewed as ``[B, H, N, D]`` is read in place."""
    buf = torch.randn(2, 513, 4, 128, device="cuda", dtype=torch.float16)
    k = buf.transpose(1, 2)
    v = torch.randn_like(buf).transpose(1, 2)
    q = torch.randn(2, 1, 16, 128, device="cuda", dtype=torch.float16).transpose(1, 2)
    _check_decode(ext, q, k, v, Causal())


def test_decode_empty_cache(ext):
    q = torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.empty(2, 2, 0, 64, device="cuda", dtype=torch.float16)
    poison()
    o, lse = ext.decode_attention(q, k, k, None, None, 0.125, -1, -1, 0)
    assert (o == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("pattern", [Dense(), SlidingWindow(4095)], ids=_pattern_id)
def test_decode_cache_100k(ext, pattern):
    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 100_000, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    wl, wr = pattern.window()
    poison()
    o, lse = ext.decode_attention(q, k, v, None, None, 128**-0.5, wl, wr, 0)
    oo, olse = attention_oracle(q, k, v, pattern, dtype=torch.float32)
    assert max_err(o, oo) <= 1e-2
    assert max_err(lse, olse) <= 1e-3


def test_decode_backend_and_compile(ext):
    from attnkit.attn.inputs import validate
    from attnkit.kernels.flash.cuda import CudaDecodeBackend

    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 2, 64, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    call = validate(q, k, v, Causal(), None, None, None, None, True)
    with torch.no_grad():
        assert CudaDecodeBackend().not_supported_reasons(call) == []
        o, lse = CudaDecodeBackend().run(call)

    def f(q, k, v):
        return torch.ops.attnkit_cuda.decode_attention(q, k, v, None, None, 128**-0.5, -1, 0, 0)

    co, clse = torch.compile(f, fullgraph=True)(q, k, v)
    assert torch.equal(co, o) and torch.equal(clse, lse)


def test_compiled_decode_through_attention_matches_eager(ext):
    """``attnkit.attention`` on a decode call under ``torch.compile(fullgraph=True)``: the CUDA
    backend steps aside (its checks cannot be traced) and the Triton decode kernel, a traceable
    custom op, gives the eager CUDA kernel's result to fp16 rounding."""
    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 2, 300, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    f = lambda q, k, v: attnkit.attention(q, k, v, SlidingWindow(100), return_lse=True)
    with torch.no_grad():
        o, lse = f(q, k, v)
        co, clse = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(co, o, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(clse, lse, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# Linear attention decode step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("feature", ["elu1", "relu", "identity"])
@pytest.mark.parametrize(
    "shape", [(3, 4, 2, 64, 64), (64, 8, 8, 128, 128), (2, 12, 4, 32, 100), (1, 16, 1, 8, 4)],
    ids=lambda s: "B{}-Hq{}-Hkv{}-Dk{}-Dv{}".format(*s),
)
def test_linear_step(ext, shape, feature, dtype):
    from attnkit.attn.linear import linear_attention_step
    from attnkit.kernels.linear.cuda import linear_attention_step_cuda

    B, Hq, Hkv, Dk, Dv = shape
    normalize = feature != "identity"  # identity's denominator can cross zero
    q = torch.randn(B, Hq, Dk, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, Dk, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, Dv, device="cuda", dtype=dtype)
    s = torch.randn(B, Hkv, Dk, Dv, device="cuda").abs()
    z = torch.rand(B, Hkv, Dk, device="cuda") + Dk
    kw = dict(feature_map=feature, normalize=normalize, eps=1e-6, scale=0.5)
    poison()
    o, s2, z2 = linear_attention_step_cuda(q, k, v, s, z, feature, normalize, 1e-6, 0.5)
    ro, (rs, rz) = linear_attention_step(q.double(), k.double(), v.double(), (s.double(), z.double()), **kw)
    assert max_err(s2, rs) <= 1e-4 * float(rs.abs().max())
    assert max_err(z2, rz) <= 1e-4 * float(rz.abs().max())
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert max_err(o, ro) <= tol * float(ro.abs().max()) + 1e-6
    # The zero-state start matches too.
    o0, s0, z0 = linear_attention_step_cuda(q, k, v, None, None, feature, normalize, 1e-6, 0.5)
    r0, (rs0, _) = linear_attention_step(q.double(), k.double(), v.double(), None, **kw)
    assert max_err(s0, rs0) <= 1e-5 * float(rs0.abs().max()) + 1e-6
    if normalize:
        assert max_err(o0, r0) <= tol * float(r0.abs().max()) + 1e-3


# --------------------------------------------------------------------------------------------
# Multi-adapter LoRA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T, fin, fout, r", [(1, 64, 96, 8), (7, 100, 130, 13), (64, 4096, 4096, 16),
                                             (33, 512, 1000, 64)],
                         ids=lambda x: str(x))
def test_lora_batched(ext, T, fin, fout, r, dtype):
    from attnkit.kernels.lora.cuda import lora_batched_cuda
    from attnkit.kernels.lora.torch_impl import lora_batched_torch

    n = 4
    x = torch.randn(T, fin, device="cuda", dtype=dtype)
    w = torch.randn(fout, fin, device="cuda", dtype=dtype) / fin**0.5
    bias = torch.randn(fout, device="cuda", dtype=dtype)
    a = torch.randn(n, r, fin, device="cuda", dtype=dtype) / fin**0.5
    b = torch.randn(n, fout, r, device="cuda", dtype=dtype) / r**0.5
    scal = torch.tensor([0.5, 1.0, 2.0, 0.25], device="cuda")
    idx = torch.randint(-1, n, (T,), device="cuda")
    idx[0] = -1
    poison()
    y = lora_batched_cuda(x, w, bias, a, b, scal, idx)
    ref = lora_batched_torch(*(t.double() for t in (x, w, bias, a, b)), scal.double(), idx)
    same = lora_batched_torch(x, w, bias, a, b, scal, idx)
    assert not torch.isnan(y).any()
    assert max_err(y, ref) <= 2 * max_err(same, ref) + 1e-2
    # rows without an adapter are exactly the base layer
    base = torch.addmm(bias, x, w.t())
    none = idx < 0
    assert torch.equal(y[none], base[none])
