"""Fused LoRA op (``attnkit.finetune.lora_linear``) on both backends against a float64 oracle.

The Triton backend runs under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py). Every kernel
output is poisoned with NaN before the kernel runs, so an element a kernel forgets to write
fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.finetune import lora_linear

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |error| / max |oracle|, per dtype (fp32 runs IEEE here: matmul precision "highest").
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
BACKENDS = ["triton", "torch"]


def _inputs(lead, n_in, n_out, r, dtype, device, bias=True):
    """Fresh random inputs, scaled so that outputs are O(1) (B random, not PEFT's zeros)."""
    x = torch.randn(*lead, n_in, device=device)
    w = torch.randn(n_out, n_in, device=device) / math.sqrt(n_in)
    b = torch.randn(n_out, device=device) if bias else None
    a = torch.randn(r, n_in, device=device) / math.sqrt(n_in)
    bb = torch.randn(n_out, r, device=device) / math.sqrt(r)
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(x), cast(w), cast(b), cast(a), cast(bb)


def _oracle(x, w, b, a, bb, s, keep=None, p=0.0):
    """float64 forward with autograd: ``x W^T + b + s (keep * x / (1-p)) A^T B^T``."""
    xd = x if keep is None else torch.where(keep, x / (1.0 - p), torch.zeros_like(x))
    y = x @ w.t() + s * (xd @ a.t()) @ bb.t()
    return y + b if b is not None else y


def _f64(*ts, grad=()):
    out = []
    for i, t in enumerate(ts):
        t = None if t is None else t.detach().double()
        if t is not None and i in grad:
            t.requires_grad_(True)
        out.append(t)
    return out


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-6)).item()


def _check(got, want, dtype, name, factor=1.0):
    assert got.shape == want.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    err = _rel_err(got, want)
    assert err <= TOL[dtype] * factor, f"{name}: relative error {err:.2e} > {TOL[dtype] * factor:.1e}"


SHAPES = [  # (leading dims, in, out, r)
    ((17,), 40, 24, 3),
    ((2, 9), 72, 56, 8),
    ((5,), 40, 56, 1),
    ((3,), 24, 40, 130),  # rank above one K2 tile, not a power of two
]


def _sid(s):
    lead, i, o, r = s
    return f"T{'x'.join(map(str, lead))}-in{i}-out{o}-r{r}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[_sid(s) for s in SHAPES])
def test_forward_backward_vs_oracle(backend, dtype, shape, device):
    lead, n_in, n_out, r = shape
    x, w, b, a, bb = _inputs(lead, n_in, n_out, r, dtype, device)
    s = 0.75
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    y = lora_linear(x, w, a, bb, s, b, backend=backend)
    dy = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, a, bb), dy)

    x64, w64, b64, a64, bb64 = _f64(x, w, b, a, bb, grad=(0, 3, 4))
    y64 = _oracle(x64, w64, b64, a64, bb64, s)
    gx64, ga64, gb64 = torch.autograd.grad(y64, (x64, a64, bb64), dy.double())
    assert y.dtype == dtype
    _check(y, y64, dtype, "y")
    _check(gx, gx64, dtype, "dx", 3)
    _check(ga, ga64, dtype, "dA", 3)
    _check(gb, gb64, dtype, "dB", 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trainable_base_weight_and_bias(backend, dtype, device):
    """dW and dbias appear only when the base weight/bias require grad."""
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, dtype, device)
    ts = [t.requires_grad_() for t in (x, w, b, a, bb)]
    y = lora_linear(x, w, a, bb, 0.5, b, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ts, dy)
    t64 = _f64(*ts, grad=(0, 1, 2, 3, 4))
    y64 = _oracle(t64[0], t64[1], t64[2], t64[3], t64[4], 0.5)
    grads64 = torch.autograd.grad(y64, t64, dy.double())
    for name, g, g64 in zip(("dx", "dW", "dbias", "dA", "dB"), grads, grads64, strict=True):
        _check(g, g64, dtype, name, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_for_frozen_and_input(backend, device):
    """Only the LoRA factors train: x and the frozen W get no gradient, dA/dB stay right."""
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, torch.float32, device)
    a.requires_grad_()
    bb.requires_grad_()
    y = lora_linear(x, w, a, bb, 2.0, b, backend=backend)
    y.square().sum().backward()
    assert w.grad is None and x.grad is None
    x64, w64, b64, a64, bb64 = _f64(x, w, b, a, bb, grad=(3, 4))
    _oracle(x64, w64, b64, a64, bb64, 2.0).square().sum().backward()
    _check(a.grad, a64.grad, torch.float32, "dA", 3)
    _check(bb.grad, bb64.grad, torch.float32, "dB", 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_weight_view_and_empty_input(backend, device):
    """W given as a transposed view (PEFT fan_in_fan_out), a strided bias and T = 0 all work."""
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, torch.float32, device)
    w_t = w.t().contiguous().t()  # same values, [out, in] view of an [in, out] tensor
    y = lora_linear(x, w_t, a, bb, 0.5, b, backend=backend)
    _check(y, _oracle(*_f64(x, w, b, a, bb), 0.5), torch.float32, "y")
    b_strided = torch.stack([b, torch.full_like(b, 1e4)], 1)[:, 0]  # stride 2: every other value
    y = lora_linear(x, w, a, bb, 0.5, b_strided, backend=backend)
    _check(y, _oracle(*_f64(x, w, b, a, bb), 0.5), torch.float32, "y (strided bias)")
    empty = lora_linear(x[:0], w, a, bb, 0.5, b, backend=backend)
    assert empty.shape == (0, 24)


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


def _recover_mask(backend, t, n, p, seed, device):
    """The keep mask a seed gives for x [t, n]: with W = 0, A = B = I and s = 1 the output is
    ``drop(x) = keep * x / (1 - p)``, so the kept elements are the non-zero ones."""
    x = torch.rand(t, n, device=device) + 0.5  # never 0
    eye = torch.eye(n, device=device)
    y = lora_linear(x, torch.zeros(n, n, device=device), eye, eye, 1.0, None, p, seed=seed,
                    backend=backend)
    keep = y != 0
    # kept elements are exactly x / (1 - p)
    torch.testing.assert_close(y[keep], x[keep] / (1 - p), rtol=1e-5, atol=1e-6)
    return keep


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_mask_forward_and_backward(backend, device):
    t, n_in, n_out, r, p, seed = 19, 40, 24, 8, 0.3, 1234
    keep = _recover_mask(backend, t, n_in, p, seed, device)
    x, w, b, a, bb = _inputs((t,), n_in, n_out, r, torch.float32, device)
    ts = [x, a, bb]
    for v in ts:
        v.requires_grad_()
    y = lora_linear(x, w, a, bb, 0.5, b, p, seed=seed, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ts, dy)
    x64, w64, b64, a64, bb64 = _f64(x, w, b, a, bb, grad=(0, 3, 4))
    y64 = _oracle(x64, w64, b64, a64, bb64, 0.5, keep, p)
    grads64 = torch.autograd.grad(y64, (x64, a64, bb64), dy.double())
    _check(y, y64, torch.float32, "y")
    for name, g, g64 in zip(("dx", "dA", "dB"), grads, grads64, strict=True):
        _check(g, g64, torch.float32, name, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate_and_seeds(backend, device):
    t, n, p = 64, 48, 0.3
    keep = _recover_mask(backend, t, n, p, 7, device)
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    other = _recover_mask(backend, t, n, p, 8, device)
    assert (other != keep).any(), "different seeds gave the same mask"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_off_in_eval(backend, device):
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, torch.float32, device)
    y = lora_linear(x, w, a, bb, 0.5, b, 0.5, training=False, backend=backend)
    _check(y, _oracle(*_f64(x, w, b, a, bb), 0.5), torch.float32, "y")


# --------------------------------------------------------------------------------------------
# Mixed precision, torch.library, bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_adapter_on_bf16_base(backend, device):
    """fp32 LoRA factors on a bf16 base (PEFT's autocast_adapter_dtype) compute in bf16 and send
    fp32 gradients back to the factors."""
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, torch.bfloat16, device)
    a32, b32 = a.float().requires_grad_(), bb.float().requires_grad_()
    y = lora_linear(x, w, a32, b32, 0.5, b, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert a32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32
    x64, w64, b64, a64, bb64 = _f64(x, w, b, a32, b32, grad=(3, 4))
    y64 = _oracle(x64, w64, b64, a64, bb64, 0.5)
    _check(y, y64, torch.bfloat16, "y")
    y64.square().sum().backward()
    _check(a32.grad, a64.grad, torch.bfloat16, "dA", 3)


def test_custom_op_registration(device):
    """Fake (meta) kernels and the autograd registration pass torch.library's checks."""
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, torch.float32, device)
    x.requires_grad_()
    a.requires_grad_()
    torch.library.opcheck(
        torch.ops.attnkit.lora_linear_fwd, (x, w, b, a, bb, 0.5, 0.0, None),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize(
    "change, exc, words",
    [
        ("rank0", ValueError, ["rank 0", "lora_A"]),
        ("a_in", ValueError, ["lora_A", "[r, 40]", "(3, 41)"]),
        ("b_shape", ValueError, ["lora_B", "[24, 3]", "(24, 4)"]),
        ("x_in", ValueError, ["x", "[..., 40]", "(17, 39)"]),
        ("bias", ValueError, ["bias", "[24]", "(23,)"]),
        ("dtype", TypeError, ["float16", "float32", "weight"]),
        ("dropout", ValueError, ["dropout_p", "1.5", "[0, 1)"]),
            ("backend", ValueError, ["backend", "'tpu'", "'triton'"]),
        ("not_tensor", TypeError, ["lora_A", "list"]),
    ],
)
def test_bad_input(change, exc, words, device):
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, torch.float32, device)
    kw = dict(x=x, weight=w, lora_A=a, lora_B=bb, scaling=0.5, bias=b)
    if change == "rank0":
        kw.update(lora_A=a[:0], lora_B=bb[:, :0])
    elif change == "a_in":
        kw["lora_A"] = torch.randn(3, 41, device=device)
    elif change == "b_shape":
        kw["lora_B"] = torch.randn(24, 4, device=device)
    elif change == "x_in":
        kw["x"] = torch.randn(17, 39, device=device)
    elif change == "bias":
        kw["bias"] = torch.randn(23, device=device)
    elif change == "dtype":
        kw["x"] = x.half()
    elif change == "dropout":
        kw["dropout_p"] = 1.5
    elif change == "backend":
        kw["backend"] = "tpu"
    elif change == "not_tensor":
        kw["lora_A"] = a.tolist()
    with pytest.raises(exc) as info:
        lora_linear(**kw)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_triton_rejects_large_rank_and_fp64(device):
    x, w, b, a, bb = _inputs((4,), 16, 16, 257, torch.float32, device)
    with pytest.raises(ValueError, match="rank 257 is above the maximum of 256"):
        lora_linear(x, w, a, bb, backend="triton")
    x, w, b, a, bb = _inputs((4,), 16, 16, 2, torch.float64, device)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        lora_linear(x, w, a, bb, backend="triton")
    # auto takes the torch backend for these, and it is right
    y = lora_linear(x, w, a, bb, 0.5, b)
    _check(y, _oracle(x, w, b, a, bb, 0.5), torch.float32, "y")


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "dropout"])
def test_torch_compile_fullgraph(p, device):
    """The Triton path traces without a graph break (custom ops + a device-side seed)."""
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, torch.float32, device)
    a.requires_grad_()
    fn = lambda x, a: lora_linear(x, w, a, bb, 0.5, b, p, backend="triton")
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y = compiled(x, a)
    y.square().sum().backward()
    assert torch.isfinite(a.grad).all()
    if p == 0.0:
        _check(y, _oracle(*_f64(x, w, b, a, bb), 0.5), torch.float32, "y")


def test_auto_never_sends_cpu_tensors_to_the_interpreter(device):
    """Under TRITON_INTERPRET=1 an explicit backend="triton" runs the kernels on the CPU, but
    "auto" takes the torch backend for CPU tensors, as attention does."""
    from attnkit.kernels.lora.backends import LoRACall, select_lora_backend

    x = torch.randn(4, 8, device=device)
    call = LoRACall(x=x, rank=2, needs_grad=True, batched=False)
    expected = "triton" if x.is_cuda else "torch"
    assert select_lora_backend(call, "auto", "lora_linear").name == expected
    assert select_lora_backend(call, "triton", "lora_linear").name == "triton"
