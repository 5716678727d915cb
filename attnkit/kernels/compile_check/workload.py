"""The public-API calls whose kernel launches the compile report captures.

Each case is one call (forward and, where it trains, backward through autograd) through attnkit's
public API with ``backend="triton"``, on CPU tensors inside :func:`~.capture.capture` and
:func:`~.capture.fake_cuda`. Inputs are ``torch.empty`` (nothing is computed, so their values do
not matter); what the launchers read on the host (block layouts, ``cu_seqlens``, key masks,
adapter indices) is real. Shapes are GPU-realistic where the compile depends on them (head dims,
features, ranks: they fix tiles and 16-divisibility of strides) and small elsewhere: N = 300 is
not a multiple of 16, as an arbitrary sequence length is not, so lengths are not specialised.

Every launch is tagged with its case (``op``, ``head_dim`` -- the rank for LoRA --, ``dtype``,
``case``), which is how records get a head dim and dtype without knowing any kernel's parameter
names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (64, 128, 256)
RANKS = (16, 64)


@dataclass
class Case:
    """One public call: ``run()`` makes it; the rest tags the launches it makes."""

    op: str  # "attention", "decode", "linear_attention", "lora_linear", "lora_batched", "grid"
    name: str  # e.g. "causal", "window+kpm", "sparse128"
    head_dim: int  # head dim; the rank for LoRA; the feature dim for linear attention
    dtype: str
    run: Callable[[], None]

    @property
    def tags(self) -> dict:
        return dict(op=self.op, case=self.name, head_dim=self.head_dim, dtype=self.dtype)


def _empty(*shape, dtype, grad=False):
    return torch.empty(shape, dtype=dtype).requires_grad_(grad)


def _backward(*outs, inputs):
    loss = sum(o.float().sum() for o in outs)
    torch.autograd.grad(loss, [t for t in inputs if t is not None and t.requires_grad],
                        allow_unused=True)


def _attention_cases(D: int, dt: str) -> Iterator[Case]:
    import attnkit
    from attnkit import BlockSparse, Causal, Dense, SlidingWindow

    dtype = DTYPES[dt]
    B, Hq, Hkv, N = 2, 4, 2, 300

    def train(pattern, valid_keys=None, lse=False, packed=False, **mods):
        def run():
            b = 1 if packed else B
            q = _empty(b, Hq, N, D, dtype=dtype, grad=True)
            k, v = (_empty(b, Hkv, N, D, dtype=dtype, grad=True) for _ in range(2))
            extra = {}
            if packed:
                extra = dict(cu_seqlens=torch.tensor([0, 100, N], dtype=torch.int32),
                             max_seqlen=200)
            kw = dict(mods)
            if kw.pop("sinks", False):  # learned per-head logits, with a gradient
                kw["sinks"] = _empty(Hq, dtype=torch.float32, grad=True)
            if kw.pop("alibi", False):
                kw["alibi_slopes"] = _empty(Hq, dtype=torch.float32)
            out = attnkit.attention(q, k, v, pattern, valid_keys=valid_keys, backend="triton",
                                    return_lse=lse, **extra, **kw)
            _backward(*(out if lse else (out,)), inputs=(q, k, v, kw.get("sinks")))
        return run

    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, 250:] = False  # one padded row: the key mask is live

    def sparse(bs):
        blocks = -(-N // bs)
        return BlockSparse(torch.ones(1, blocks, blocks, dtype=torch.bool).tril(), bs,
                           causal=True)

    yield Case("attention", "dense+lse", D, dt, train(Dense(), lse=True))
    yield Case("attention", "causal", D, dt, train(Causal()))
    yield Case("attention", "window+kpm", D, dt, train(SlidingWindow(100), valid_keys=kpm))
    yield Case("attention", "window", D, dt, train(SlidingWindow(100)))
    yield Case("attention", "window+lse", D, dt, train(SlidingWindow(63), lse=True))
    yield Case("attention", "varlen", D, dt, train(Causal(), packed=True))
    # score modifications: Gemma-2-style (softcap + window) and gpt-oss-style (sinks + window),
    # and ALiBi on top of both
    yield Case("attention", "window+softcap", D, dt, train(SlidingWindow(100), softcap=50.0))
    yield Case("attention", "window+sinks+alibi", D, dt,
               train(SlidingWindow(100), sinks=True, alibi=True))
    for bs in (128, 64, 16):
        name = f"sparse{bs}" + ("+kpm" if bs == 128 else "")
        yield Case("attention", name, D, dt,
                   train(sparse(bs), valid_keys=kpm if bs == 128 else None))
    # the deterministic backward (dK/dV, then the separate dQ kernel): what
    # torch.use_deterministic_algorithms selects; the default fuses dQ into the dK/dV kernel.
    # Last, so that the report files each shared forward config under its plain case.
    yield _deterministic(Case("attention", "dense+lse", D, dt, train(Dense(), lse=True)))
    yield _deterministic(Case("attention", "window+kpm", D, dt,
                              train(SlidingWindow(100), valid_keys=kpm)))


def _decode_cases(D: int, dt: str) -> Iterator[Case]:
    import attnkit
    from attnkit import Causal, SlidingWindow

    dtype = DTYPES[dt]

    def decode(group, nq, pattern, kpm):
        def run():
            B, Hkv, Nk = 2, 2, 4096
            q = _empty(B, Hkv * group, nq, D, dtype=dtype)
            k, v = (_empty(B, Hkv, Nk, D, dtype=dtype) for _ in range(2))
            keys = torch.ones(B, Nk, dtype=torch.bool) if kpm else None
            with torch.no_grad():
                attnkit.attention(q, k, v, pattern, valid_keys=keys, backend="triton")
        return run

    yield Case("decode", "g4 nq1 causal+kpm", D, dt, decode(4, 1, Causal(), True))
    yield Case("decode", "g8 nq4 window", D, dt, decode(8, 4, SlidingWindow(300), False))


def _linear_cases(D: int, dt: str) -> Iterator[Case]:
    import attnkit

    dtype = DTYPES[dt]

    def train(causal, dv):
        def run():
            q, k = (_empty(2, 4, 300, D, dtype=dtype, grad=True) for _ in range(2))
            v = _empty(2, 4, 300, dv, dtype=dtype, grad=True)
            out = attnkit.linear_attention(q, k, v, causal=causal, backend="triton")
            _backward(out, inputs=(q, k, v))
        return run

    def packed():  # three sequences (one empty) read in place, per-sequence states with gradients
        q, k = (_empty(1, 4, 600, D, dtype=dtype, grad=True) for _ in range(2))
        v = _empty(1, 4, 600, D, dtype=dtype, grad=True)
        state = (_empty(3, 4, D, D, dtype=torch.float32, grad=True),
                 _empty(3, 4, D, dtype=torch.float32, grad=True))
        cu = torch.tensor([0, 300, 300, 600], dtype=torch.int32)
        o, st = attnkit.linear_attention(q, k, v, decay=0.9, cu_seqlens=cu, initial_state=state,
                                         return_state=True, backend="triton")
        _backward(o, st.s, st.z, inputs=(q, k, v, *state))

    def hybrid():  # the flash window part and the linear kernel on mapped (identity) features
        q, k = (_empty(2, 4, 300, D, dtype=dtype, grad=True) for _ in range(2))
        v = _empty(2, 4, 300, D, dtype=dtype, grad=True)
        out = attnkit.linear_attention(q, k, v, window=64, decay=0.9, backend="triton")
        _backward(out, inputs=(q, k, v))

    yield Case("linear_attention", "causal", D, dt, train(True, D))
    yield Case("linear_attention", "noncausal", D, dt, train(False, D))
    yield Case("linear_attention", "varlen causal decay", D, dt, packed)
    yield Case("linear_attention", "hybrid W=64 decay", D, dt, hybrid)


def _lora_cases(r: int, dt: str) -> Iterator[Case]:
    from attnkit.finetune import lora_batched, lora_linear

    dtype = DTYPES[dt]
    IN = OUT = 4096  # a 7B model's projection

    def train(p):
        def run():
            x = _empty(300, IN, dtype=dtype, grad=True)
            w = _empty(OUT, IN, dtype=dtype, grad=True)
            a = _empty(r, IN, dtype=dtype, grad=True)
            b = _empty(OUT, r, dtype=dtype, grad=True)
            y = lora_linear(x, w, a, b, 0.5, _empty(OUT, dtype=dtype), p, seed=7,
                            backend="triton")
            _backward(y, inputs=(x, w, a, b))
        return run

    def batched():
        x = _empty(40, IN, dtype=dtype)
        index = torch.arange(40) % 4 - 1  # -1: base layer only
        with torch.no_grad():
            lora_batched(x, _empty(OUT, IN, dtype=dtype), _empty(3, r, IN, dtype=dtype),
                         _empty(3, OUT, r, dtype=dtype), torch.ones(3), index, backend="triton")

    yield Case("lora_linear", "no dropout", r, dt, train(0.0))
    yield Case("lora_linear", "dropout", r, dt, train(0.1))
    yield Case("lora_batched", "3 adapters", r, dt, batched)


def _grid_cases(dt: str) -> Iterator[Case]:
    """More (batch, head) pairs than one grid axis holds: heads go on y, batch rows on z."""
    import attnkit
    from attnkit import Causal

    dtype = DTYPES[dt]

    def run():
        q, k, v = (_empty(33000, 2, 2, 16, dtype=dtype, grad=True) for _ in range(3))
        _backward(attnkit.attention(q, k, v, Causal(), scale=0.25, backend="triton"),
                  inputs=(q, k, v))
        _backward(attnkit.linear_attention(q, k, v, backend="triton"), inputs=(q, k, v))

    yield Case("grid", "33000 sequences", 16, dt, run)


def _deterministic(case: Case) -> Case:
    """``case`` under ``torch.use_deterministic_algorithms(True)``, named ``"... det"``: the flash
    backward then runs its deterministic kernels (dK/dV, then the separate dQ kernel)."""

    def run():
        saved = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            case.run()
        finally:
            torch.use_deterministic_algorithms(saved)

    return Case(case.op, case.name + " det", case.head_dim, case.dtype, run)


def _tf32(case: Case) -> Case:
    """``case`` under ``torch.set_float32_matmul_precision("high")``: fp32 launches follow
    PyTorch's matmul precision, so the default ("highest") compiles IEEE fp32 dots and this one
    TF32 (what training usually sets)."""

    def run():
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            case.run()
        finally:
            torch.set_float32_matmul_precision(saved)

    return Case(case.op, case.name + " tf32", case.head_dim, case.dtype, run)


def cases(ops=None, head_dims=None, dtypes=None) -> list[Case]:
    """Every case, or those of ``ops`` / ``head_dims`` (ranks for LoRA) / ``dtypes``. ``"grid"``
    (the grid-limit calls, for the dry run) only when asked for by name. fp32 cases come twice:
    at PyTorch's default matmul precision and, named ``"... tf32"``, at TF32."""
    dtypes = dtypes or ("bf16", "fp32")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"dtypes {unknown}: accepted are {sorted(DTYPES)}")
    out = []
    for dt in dtypes:
        for D in HEAD_DIMS:
            out += [*_attention_cases(D, dt), *_decode_cases(D, dt), *_linear_cases(D, dt)]
        for r in RANKS:
            out += list(_lora_cases(r, dt))
        out += list(_grid_cases(dt))
    out += [_tf32(c) for c in out if c.dtype == "fp32"]
    keep = [c for c in out if (ops is None and c.op != "grid") or (ops and c.op in ops)]
    if head_dims:
        keep = [c for c in keep if c.head_dim in head_dims]
    return keep


def capture_cases(selected: list[Case], keep_raw: bool = False):
    """Run ``selected`` under :func:`~.capture.capture` and :func:`~.capture.fake_cuda`; returns
    the :class:`~.capture.Recorder` (a call that raises is a problem naming its case)."""
    from .capture import capture, fake_cuda

    with capture(keep_raw) as rec, fake_cuda():
        for case in selected:
            rec.case = case.tags
            try:
                case.run()
            except Exception as exc:  # noqa: BLE001 - reported with the case it broke
                rec.problems.append(f"{case.op} {case.name} D={case.head_dim} {case.dtype}: "
                                    f"{type(exc).__name__}: {exc}")
    return rec
