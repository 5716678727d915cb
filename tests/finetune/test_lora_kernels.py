"""Fused LoRA op (``attnkit.finetune.lora_linear``) on both backends against the float64 oracle
(``attnkit.kernels.lora.naive``), judged by ``tests/harness.py``'s rule.

The Triton backend runs under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py). Every kernel
output is poisoned with NaN before the kernel runs, so an element a kernel forgets to write
fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.finetune import lora_linear
from attnkit.kernels.lora.naive import lora_linear_naive
from tests.harness import K_GRAD, K_OUT, assert_close_to_oracle, max_err

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# This file's former bound, max |error| / max |oracle| per dtype (fp32 runs IEEE here: matmul
# precision "highest"), x 3 for gradients, is kept on top of the harness's rule: measured on these
# cases it is the tighter of the two for every output and most fp32 gradients (the harness adds
# 4 ulps of max(1, |y|), or 2e-5 x factor x max(1, |y|) in fp32), while the harness's same-dtype
# budget is the tighter one for the fp16/bf16 gradients. Each check asserts both.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 2e-5}
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


def _leaves(ts, dtype, grad=()):
    """Detached copies of ``ts`` (x, w, b, a, bb) in ``dtype``; those at ``grad`` require grad."""
    out = []
    for i, t in enumerate(ts):
        t = None if t is None else t.detach().to(dtype)
        if t is not None and i in grad:
            t.requires_grad_(True)
        out.append(t)
    return out


def _naive(ts, dtype, s, grad=(), dy=None, keep=None, p=0.0):
    """The oracle on copies of ``ts = (x, w, b, a, bb)`` in ``dtype``: ``(y, grads)``, the
    gradients taken w.r.t. the inputs at ``grad``, of ``<y, dy>`` (``dy``: a tensor) or of
    ``dy(y)`` (``dy``: a loss function)."""
    x, w, b, a, bb = leaves = _leaves(ts, dtype, grad)
    y = lora_linear_naive(x, w, a, bb, s, b, keep, p, dtype=dtype)
    grads = ()
    if grad:
        wrt = [leaves[i] for i in grad]
        if callable(dy):
            grads = torch.autograd.grad(dy(y), wrt)
        else:
            grads = torch.autograd.grad(y, wrt, dy.to(dtype))
    return y.detach(), grads


def _check(name, got, ref64, lowp, dtype, factor=1.0):
    """``got`` against the float64 oracle ``ref64`` under the harness's rule (``lowp``: the same
    naive computation in ``dtype``; ``factor`` 1 = outputs, 3 = gradients) and this file's former
    relative bound, both."""
    assert got.shape == ref64.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    assert_close_to_oracle(name, got, ref64, lowp, dtype, K_GRAD if factor > 1 else K_OUT)
    err = max_err(got, ref64) / max(float(ref64.double().abs().max()), 1e-6)
    bound = REL_TOL[dtype] * factor
    assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.1e}"


def _check_y(name, y, ts, dtype, s, keep=None, p=0.0):
    """An output against the oracle on ``ts = (x, w, b, a, bb)``."""
    _check(name, y, _naive(ts, torch.float64, s, keep=keep, p=p)[0],
           _naive(ts, dtype, s, keep=keep, p=p)[0], dtype)


def _check_grads(names, got, dtype, ts, s, grad, dy, keep=None, p=0.0):
    """Gradients ``got`` (w.r.t. the inputs of ``ts`` at ``grad``) against the oracle's."""
    _, ref = _naive(ts, torch.float64, s, grad, dy, keep, p)
    _, low = _naive(ts, dtype, s, grad, dy, keep, p)
    for name, g, g64, glow in zip(names, got, ref, low, strict=True):
        _check(name, g, g64, glow, dtype, 3)


SHAPES = [  # (leading dims, in, out, r)
    ((17,), 40, 24, 3),
    ((2, 9), 72, 56, 8),
    ((5,), 40, 56, 1),
    ((3,), 24, 40, 130),  # rank above one K2 tile, not a power of two
    ((2, 9), 64, 128, 20),  # in and out multiples of every BLOCK_K (EVEN_K), the rank prefetched
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

    assert y.dtype == dtype
    ts = (x, w, b, a, bb)
    _check_y("y", y, ts, dtype, s)
    _check_grads(("dx", "dA", "dB"), (gx, ga, gb), dtype, ts, s, (0, 3, 4), dy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trainable_base_weight_and_bias(backend, dtype, device):
    """dW and dbias appear only when the base weight/bias require grad."""
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, dtype, device)
    ts = [t.requires_grad_() for t in (x, w, b, a, bb)]
    y = lora_linear(x, w, a, bb, 0.5, b, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ts, dy)
    _check_grads(("dx", "dW", "dbias", "dA", "dB"), grads, dtype, ts, 0.5, (0, 1, 2, 3, 4), dy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_for_frozen_and_input(backend, device):
    """Only the LoRA factors train: x and the frozen W get no gradient, dA/dB stay right."""
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, torch.float32, device)
    a.requires_grad_()
    bb.requires_grad_()
    y = lora_linear(x, w, a, bb, 2.0, b, backend=backend)
    y.square().sum().backward()
    assert w.grad is None and x.grad is None
    _check_grads(("dA", "dB"), (a.grad, bb.grad), torch.float32, (x, w, b, a, bb), 2.0, (3, 4),
                 lambda y: y.square().sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_weight_view_and_empty_input(backend, device):
    """W given as a transposed view (PEFT fan_in_fan_out), a strided bias and T = 0 all work."""
    x, w, b, a, bb = _inputs((17,), 40, 24, 3, torch.float32, device)
    w_t = w.t().contiguous().t()  # same values, [out, in] view of an [in, out] tensor
    y = lora_linear(x, w_t, a, bb, 0.5, b, backend=backend)
    _check_y("y", y, (x, w, b, a, bb), torch.float32, 0.5)
    b_strided = torch.stack([b, torch.full_like(b, 1e4)], 1)[:, 0]  # stride 2: every other value
    y = lora_linear(x, w, a, bb, 0.5, b_strided, backend=backend)
    _check_y("y (strided bias)", y, (x, w, b, a, bb), torch.float32, 0.5)
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
    ts = (x, w, b, a, bb)
    _check_y("y", y, ts, torch.float32, 0.5, keep, p)
    _check_grads(("dx", "dA", "dB"), grads, torch.float32, ts, 0.5, (0, 3, 4), dy, keep, p)


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
    _check_y("y", y, (x, w, b, a, bb), torch.float32, 0.5)


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
    ts = (x, w, b, a32, b32)
    _check_y("y", y, ts, torch.bfloat16, 0.5)
    _check_grads(("dA",), (a32.grad,), torch.bfloat16, ts, 0.5, (3,),
                 lambda y: y.double().square().sum())


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
    _check_y("y", y, (x, w, b, a, bb), torch.float64, 0.5)


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
        _check_y("y", y, (x, w, b, a, bb), torch.float32, 0.5)


def test_auto_never_sends_cpu_tensors_to_the_interpreter(device):
    """Under TRITON_INTERPRET=1 an explicit backend="triton" runs the kernels on the CPU, but
    "auto" takes the torch backend for CPU tensors, as attention does."""
    from attnkit.kernels.lora.backends import LoRACall, select_lora_backend

    x = torch.randn(4, 8, device=device)
    call = LoRACall(x=x, rank=2, needs_grad=True, batched=False)
    expected = "triton" if x.is_cuda else "torch"
    assert select_lora_backend(call, "auto", "lora_linear").name == expected
    assert select_lora_backend(call, "triton", "lora_linear").name == "triton"


def test_fused_autotuner_offers_128x256_for_half_precision_only():
    """The wide tile is offered to bf16/fp16 without dropout; fp32 (shared memory) and dropout
    (the epilogue's Philox mask spills past 64x64) prune it."""
    from attnkit.kernels.lora.tiles import FUSED, _prune_fused

    def offered(dtype, dropout):
        kept = _prune_fused(FUSED.configs, {"X1": torch.empty(1, dtype=dtype)}, DROPOUT=dropout)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept}

    assert (128, 256) in offered(torch.bfloat16, False)
    assert (128, 256) in offered(torch.float16, False)
    assert (128, 256) not in offered(torch.float32, False)
    assert (128, 256) not in offered(torch.bfloat16, True)
    assert (FUSED.configs[0].kwargs["BLOCK_M"], FUSED.configs[0].kwargs["BLOCK_N"]) == (128, 128)
