"""The functional API's contract: argument checking, backend choice, return values."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnkit
from attnkit import Causal, SlidingWindow
from attnkit.attn.inputs import validate
from attnkit.kernels import dispatch as bk
from attnkit.kernels.flash.backends import BACKENDS, TritonDecode, TritonFlash
from tests.conftest import DEVICE


def qkv(B=1, Hq=2, Hkv=2, N=8, D=16, dtype=torch.float32, Nk=None):
    q = torch.randn(B, Hq, N, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, Hkv, Nk or N, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, Hkv, Nk or N, D, dtype=dtype, device=DEVICE)
    return q, k, v


def _raises(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        attnkit.attention(*args, **kwargs)


def test_not_a_tensor():
    q, k, v = qkv()
    _raises(TypeError, r"^k must be a torch.Tensor, got list", q, [1.0], v)


def test_wrong_rank_names_argument_and_layout():
    q, k, v = qkv()
    _raises(ValueError, r"q must be 4-D \[B, Hq, Nq, D\], got shape \(2, 8, 16\)", q[0], k, v)


def test_integer_dtype():
    q, k, v = qkv()
    _raises(TypeError, r"q has dtype torch.int64; expected a floating dtype", q.long(), k, v)


def test_mixed_dtypes():
    q, k, v = qkv()
    _raises(TypeError, r"share one dtype", q, k.half(), v)


def test_different_devices():
    q, k, v = qkv()
    _raises(ValueError, r"one device, got q on .*, k on meta", q, k.to("meta"), v)


def test_mismatched_shapes():
    q, k, v = qkv()
    _raises(ValueError, r"k and v must share \[B, Hkv, Nk\]", q, k, v[:, :, :5])
    _raises(ValueError, r"k has head dim 8 but q has 16", q, k[..., :8], v[..., :8])
    q2, k2, v2 = qkv(B=2)
    _raises(ValueError, r"k has batch size 2 but q has 1", q, k2, v2)


def test_heads_not_a_multiple():
    q, k, v = qkv(Hq=3, Hkv=2)
    _raises(ValueError, r"query heads \(3\) must be a multiple of the number of key/value heads \(2\)",
            q, k, v)


def test_head_dim_above_256_on_triton():
    q, k, v = qkv(D=320)
    _raises(ValueError, r"'triton' backend cannot run.*head dim 320 is above the maximum of 256",
            q, k, v, backend="triton")
    # the torch backend has no such limit
    assert attnkit.attention(q, k, v, backend="torch").shape == q.shape


def test_float_mask_is_rejected_with_a_hint():
    q, k, v = qkv()
    _raises(TypeError, r"valid_keys must be a bool tensor.*got dtype torch.float32.*mask == 0",
            q, k, v, valid_keys=torch.zeros(1, 8, device=DEVICE))


def test_mask_shape():
    q, k, v = qkv()
    _raises(ValueError, r"valid_keys must have shape \[B, Nk\] = \[1, 8\], got \(1, 7\)",
            q, k, v, valid_keys=torch.ones(1, 7, dtype=torch.bool, device=DEVICE))


def test_negative_and_non_integer_windows():
    with pytest.raises(ValueError, match=r"SlidingWindow: left must be >= 0, got -1"):
        SlidingWindow(-1)
    with pytest.raises(ValueError, match=r"right must be >= 0, got -2"):
        SlidingWindow(3, -2)
    with pytest.raises(TypeError, match=r"left must be an int, got float 1.5"):
        SlidingWindow(1.5)
    with pytest.raises(TypeError, match=r"left must be an int, got bool"):
        SlidingWindow(True)


def test_pattern_must_be_a_pattern():
    q, k, v = qkv()
    _raises(TypeError, r"pattern must be an attnkit pattern.*got str 'causal'", q, k, v, "causal")


def test_scale_checks():
    q, k, v = qkv()
    _raises(TypeError, r"scale must be a float or None, got str", q, k, v, scale="0.1")
    _raises(ValueError, r"scale must be finite, got nan", q, k, v, scale=float("nan"))


def test_cu_seqlens_checks():
    q, k, v = qkv()
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    _raises(TypeError, r"cu_seqlens must have dtype torch.int32", q, k, v, cu_seqlens=cu.float())
    _raises(ValueError, r"must start at 0, be non-decreasing and end at most at N = 8",
            q, k, v, cu_seqlens=torch.tensor([0, 5, 3], dtype=torch.int32, device=DEVICE))
    q2, k2, v2 = qkv(B=2)
    _raises(ValueError, r"pack all sequences into B = 1, got B = 2", q2, k2, v2, cu_seqlens=cu)
    mask = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    _raises(ValueError, r"either valid_keys or cu_seqlens", q, k, v, cu_seqlens=cu,
            valid_keys=mask)
    _raises(ValueError, r"max_seqlen is only meaningful together with cu_seqlens", q, k, v,
            max_seqlen=4)
    _raises(ValueError, r"max_seqlen must be at least the longest packed sequence \(5\), got 3",
            q, k, v, cu_seqlens=cu, max_seqlen=3)


def test_unknown_backend_lists_choices():
    q, k, v = qkv()
    _raises(ValueError, r"backend must be one of 'auto', 'cuda', 'triton', 'torch', got 'tpu'",
            q, k, v, backend="tpu")


def test_explicit_backend_lists_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a CPU machine without the interpreter
    q, k, v = (t.cpu() for t in qkv(dtype=torch.float64, D=300))  # CPU also on a GPU machine
    with pytest.raises(ValueError) as info:
        attnkit.attention(q, k, v, backend="triton")
    msg = str(info.value)
    assert "tensors are on cpu" in msg and "dtype torch.float64" in msg and "head dim 300" in msg


def test_more_sequences_than_the_grid_takes_is_refused_by_triton(monkeypatch):
    """CUDA caps the grid's y and z axes, where the flash kernels put heads and batch rows, at
    65535 each: past it the triton backend refuses with a reason (auto takes torch, with the
    one-time warning); decode-shaped no-grad calls, whose kernel puts (batch, head) on x, are
    still taken."""
    monkeypatch.setattr(bk, "GRID_AXIS_MAX", 3)
    q, k, v = qkv(B=4, Hq=2, Hkv=2, N=20)
    with pytest.raises(ValueError, match="4 sequences is above CUDA's grid limit of 3 per axis"):
        attnkit.attention(q, k, v, backend="triton")
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32, device=q.device)  # 3 sequences: fits
    call = validate(q[:1], k[:1], v[:1], None, None, None, cu, None, False)
    assert not any("grid limit" in r for r in TritonFlash().not_supported_reasons(call))
    with torch.no_grad():
        decode_call = validate(q[:, :, :1], k, v, Causal(), None, None, None, None, False)
        assert TritonDecode().not_supported_reasons(decode_call) == []
        assert isinstance(bk.select_backend(decode_call, "triton", BACKENDS, "attention"),
                          TritonDecode)
    ql, kl, vl = qkv(B=2, Hq=4, Hkv=2, N=20)
    with pytest.raises(ValueError, match="4 heads is above CUDA's grid limit"):
        attnkit.linear_attention(ql, kl, vl, backend="triton")


def test_auto_uses_torch_on_cpu_and_env_override(monkeypatch):
    q, k, v = qkv()
    call = validate(q, k, v, None, None, None, None, None, False)
    expected = "triton" if q.is_cuda else "torch"
    assert bk.select_backend(call, "auto", BACKENDS, "attention").name == expected
    monkeypatch.setenv("ATTNKIT_BACKEND", "torch")
    assert bk.select_backend(call, "auto", BACKENDS, "attention").name == "torch"
    monkeypatch.setenv("ATTNKIT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="got 'nonsense'"):
        bk.select_backend(call, "auto", BACKENDS, "attention")


def test_auto_fallback_warns_once():
    """A CUDA tensor that lands on the torch backend is said once, with the Triton reasons."""

    class Picky(bk.Backend):
        name = "triton"
        kind = "triton"

        def not_supported_reasons(self, call):
            return ["it is Tuesday"]

    class Slow(bk.Backend):
        name = "torch"
        kind = "torch"

    class FakeCall:  # what the dispatch reads: a tensor that says it is on a GPU
        tensor = type("CudaLike", (), {"is_cuda": True, "device": torch.device("cuda")})()

    call = FakeCall()
    backends = (Picky(), Slow())
    with pytest.warns(UserWarning, match=r"slower 'torch' backend because the 'triton' backend .*Tuesday"):
        assert bk.select_backend(call, "auto", backends, "unit_test").name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        assert bk.select_backend(call, "auto", backends, "unit_test").name == "torch"


def test_return_lse_flag():
    q, k, v = qkv()
    out = attnkit.attention(q, k, v, Causal())
    assert isinstance(out, torch.Tensor)
    o, lse = attnkit.attention(q, k, v, Causal(), return_lse=True)
    torch.testing.assert_close(o, out)
    assert lse.shape == (1, 2, 8) and lse.dtype == torch.float32


def test_scale_is_applied():
    q, k, v = qkv()
    torch.testing.assert_close(attnkit.attention(q, k, v, scale=0.5),
                               attnkit.attention(q * 2, k, v, scale=0.25))


@pytest.mark.parametrize("chunk", ["1", "7", "64"])
def test_torch_backend_chunking_does_not_change_results(monkeypatch, chunk):
    q, k, v = qkv(B=2, Hq=4, Hkv=2, N=37)
    for t in (q, k, v):
        t.requires_grad_()
    ref = attnkit.attention(q, k, v, SlidingWindow(5, 2), backend="torch")
    ref_g = torch.autograd.grad(ref.sum(), (q, k, v))
    monkeypatch.setenv("ATTNKIT_TORCH_CHUNK", chunk)
    out = attnkit.attention(q, k, v, SlidingWindow(5, 2), backend="torch")
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), ref_g, strict=True):
        torch.testing.assert_close(a, b)


def test_env_backend_an_op_lacks_is_ignored_for_that_op(monkeypatch):
    """ATTNKIT_BACKEND=cuda forces attention's "cuda" backend but leaves linear attention (which
    has none) on its own "auto"; a misspelt value is still an error."""
    from attnkit import linear_attention

    q, k, v = qkv()
    monkeypatch.setenv("ATTNKIT_BACKEND", "cuda")
    call = validate(q, k, v, None, None, None, None, None, False)
    with pytest.raises(ValueError, match=r"'cuda' backend cannot run"):
        bk.select_backend(call, "auto", BACKENDS, "attention")
    assert linear_attention(q, k, v).shape == q.shape
    monkeypatch.setenv("ATTNKIT_BACKEND", "trition")
    with pytest.raises(ValueError, match=r"got 'trition'"):
        linear_attention(q, k, v)


def test_pytorch_key_padding_mask_name_is_refused_with_both_conventions():
    """``key_padding_mask`` means True = padding in torch.nn.MultiheadAttention; attnkit's key mask
    means True = attend. The old name must never run silently with the opposite meaning."""
    q, k, v = qkv()
    pad = torch.zeros(1, 8, dtype=torch.bool, device=DEVICE)
    pad[0, -3:] = True  # PyTorch convention: the last three keys are padding
    with pytest.raises(TypeError, match=r"key_padding_mask is not accepted.*PADDING with True.*"
                                        r"ATTEND with True.*valid_keys=~key_padding_mask"):
        attnkit.attention(q, k, v, key_padding_mask=pad)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'kpm'"):
        attnkit.attention(q, k, v, kpm=pad)
    # the conversion the message gives is exact: padded keys are ignored
    o = attnkit.attention(q, k, v, valid_keys=~pad)
    ref = attnkit.attention(q, k[:, :, :5], v[:, :, :5])
    torch.testing.assert_close(o, ref)
