"""``lora_batched`` on the Triton path makes no host sync: the block table is built with torch ops
on the index's device, the index range is checked on the device, and tensor scalings are used
as they are. Checked on CPU by recording every way a tensor's value can reach the host."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit.finetune.functional as functional
from attnkit.finetune import lora_batched
from attnkit.kernels.lora import op
from attnkit.kernels.lora.naive import lora_batched_naive
from attnkit.kernels.lora.tiles import block_table, max_blocks

# Tensor methods that hand a value to Python. ``.item()``/``int()``/``bool()`` also go through
# ``aten._local_scalar_dense`` (recorded below); ``.tolist()`` does not, so it is caught here.
_HOST_READS = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu"}


class _SyncRecorder(TorchDispatchMode):
    """Every ``aten._local_scalar_dense`` (the op behind each scalar read of a tensor's value)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


class _HostReadRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _record(fn):
    """``(result, host reads)`` of ``fn()``."""
    with _SyncRecorder() as syncs, _HostReadRecorder() as reads:
        out = fn()
    return out, syncs.calls + reads.calls


def _inputs(t, n_in, n_out, r, n, dtype=torch.float32):
    x = torch.randn(t, n_in)
    w = torch.randn(n_out, n_in) / math.sqrt(n_in)
    b = torch.randn(n_out)
    a = torch.randn(n, r, n_in) / math.sqrt(n_in)
    bb = torch.randn(n, n_out, r) / math.sqrt(r)
    return [v.to(dtype) for v in (x, w, b, a, bb)]


def _host_table(index, n_adapters, block_m):
    """The former host-built table (one ``.tolist()`` sync): the reference for the real blocks."""
    order = torch.argsort(index, stable=True).to(torch.int32)
    counts = torch.bincount(index.long() + 1, minlength=n_adapters + 1).tolist()
    row0, blen, badapter, start = [], [], [], 0
    for slot, count in enumerate(counts):
        for off in range(0, count, block_m):
            row0.append(start + off)
            blen.append(min(block_m, count - off))
            badapter.append(slot - 1)
        start += count
    mk = lambda v: torch.tensor(v, dtype=torch.int32)
    return order, mk(row0), mk(blen), mk(badapter)


@pytest.fixture
def device_like(monkeypatch):
    """Validation takes the GPU branch (device-side check) on these CPU tensors."""
    monkeypatch.setattr(functional, "_index_checked_on_host", lambda idx: False)


def test_detector_sees_a_host_sync():
    """The recorders are not blind: the former table and the CPU range check are both caught."""
    index = torch.tensor([1, -1, 0, 1])
    _, calls = _record(lambda: _host_table(index, 2, 16))
    assert "tolist" in calls
    _, calls = _record(lambda: functional._check_index(index, 2))
    assert "aten._local_scalar_dense.default" in calls


def test_triton_path_makes_no_host_sync(device_like):
    x, w, b, a, bb = _inputs(37, 40, 24, 4, 3)
    scalings = torch.tensor([0.5, 2.0, -1.0])
    index = torch.randint(-1, 3, (37,))
    y, calls = _record(lambda: lora_batched(x, w, a, bb, scalings, index, b, backend="triton"))
    assert calls == [], f"host reads on the device path: {calls}"
    want = lora_batched_naive(x, w, b, a, bb, scalings, index)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t, n, block_m", [(37, 3, 16), (130, 2, 16), (5, 8, 64), (1, 1, 16),
                                           (200, 4, 64)])
def test_device_table_matches_host_table(t, n, block_m):
    index = torch.randint(-1, n, (t,))
    index[: min(t, 3)] = 0  # one group spanning several blocks when t is large
    order, row0, blen, badapter = block_table(index, n, block_m)
    ref = _host_table(index, n, block_m)
    nb = ref[1].numel()
    assert row0.numel() == blen.numel() == badapter.numel() == max_blocks(t, n, block_m) >= nb
    for got, want in zip((order, row0[:nb], blen[:nb], badapter[:nb]), ref, strict=True):
        assert got.dtype == torch.int32
        assert torch.equal(got, want)
    # padding blocks: empty, no adapter (their programs return at once)
    assert (blen[nb:] == 0).all() and (badapter[nb:] == -1).all()


def test_outputs_bitwise_equal_to_host_table(monkeypatch):
    """Same blocks in the same order: the kernels compute exactly what they did before."""
    x, w, b, a, bb = _inputs(130, 40, 24, 4, 3)
    index = torch.randint(-1, 3, (130,))
    scal = torch.tensor([0.5, 2.0, -1.0])
    y = op.lora_batched_triton(x, w, b, a, bb, scal, index)
    monkeypatch.setattr(op, "block_table", _host_table)
    y_host = op.lora_batched_triton(x, w, b, a, bb, scal, index)
    assert torch.equal(y, y_host)


def test_out_of_range_rows_map_to_no_adapter():
    """A bad index (flagged by the device-side check) never selects an adapter past the stack."""
    index = torch.tensor([0, 5, -3, 1, 1])
    order, row0, blen, badapter = block_table(index, 2, 16)
    real = blen > 0
    assert badapter[real].tolist() == [-1, 0, 1]
    assert blen[real].tolist() == [2, 1, 2]
    assert order[:2].tolist() == [1, 2]  # rows 1 and 2 (index 5 and -3) with the base layer alone


def test_device_check_flags_bad_index(device_like):
    x, w, b, a, bb = _inputs(6, 40, 24, 4, 3)
    bad = torch.tensor([0, 1, 2, 3, 0, 0])
    # on CPU torch._assert_async raises at once; on a GPU it is a device-side assert
    with pytest.raises(RuntimeError, match=r"adapter_index outside \[-1, 2\]"):
        lora_batched(x, w, a, bb, torch.ones(3), bad, b, backend="triton")


def test_cpu_call_still_raises_value_error():
    x, w, b, a, bb = _inputs(6, 40, 24, 4, 3)
    with pytest.raises(ValueError, match=r"adapter_index holds 3, outside \[-1, 2\]"):
        lora_batched(x, w, a, bb, [1.0] * 3, torch.tensor([0, 1, 2, 3, 0, 0]), b)


def test_tensor_scalings_reach_the_kernel_uncopied(monkeypatch):
    x, w, b, a, bb = _inputs(6, 40, 24, 4, 3)
    scalings = torch.tensor([1.0, 2.0, 3.0])
    seen = {}

    def spy(call, backend):
        seen["scalings"] = call.scalings
        return torch.zeros(6, 24)

    monkeypatch.setattr(functional, "run_lora", spy)
    lora_batched(x, w, a, bb, scalings, torch.zeros(6, dtype=torch.long), b)
    assert seen["scalings"].data_ptr() == scalings.data_ptr()  # a view, not a copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync detector needs a GPU")
def test_cuda_sync_debug_mode_sees_no_sync():
    x, w, b, a, bb = (t.cuda().half() for t in _inputs(40, 64, 48, 8, 3))
    scalings = torch.tensor([0.5, 2.0, -1.0], device="cuda")
    index = torch.randint(-1, 3, (40,), device="cuda")
    run = lambda: lora_batched(x, w, a, bb, scalings, index, b, backend="triton")
    want = run()  # compiles the kernels first
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y, want)
