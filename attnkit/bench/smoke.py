"""``--gpu-check``'s first phase: every Triton kernel once, at a realistic size, against the torch path.

Each check runs one public call on the Triton backend (forward and, where there is one, the
gradients), the same call on the torch backend in float32 (the reference) and in the check's own
dtype (what rounding alone costs), and passes when the Triton error against the reference is at
most ``2x`` (outputs) / ``3x`` (gradients) the torch path's own low-precision error plus a few ulps
of the result (the test suite's rule). ``smoke.json`` is rewritten after every check, so a run cut
short keeps what it checked. Sizes: ``"gpu"`` (a few seconds each on an H100/H200, compiles
included) or ``"tiny"`` (the CPU tests, through the Triton interpreter).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["CHECKS", "run_smoke", "compare", "SIZES"]

#: Per size: attention (B, Hq, Hkv, N, D), decode (B, Hq, Hkv, Nk, D), linear (B, H, N, D),
#: LoRA (tokens, hidden, rank); ``gqa_kv``: the KV heads of the score-mod check (GQA). On the GPU
#: the flash checks use the headline table's specialisations (MHA, D = 128, bf16, BigBird blocks
#: of 128), so the table reuses their compiles (lengths are not specialised on: autotune.py).
SIZES = {
    "gpu": dict(attn=(2, 16, 16, 2048, 128), decode=(4, 32, 8, 8192, 128),
                linear=(2, 16, 2048, 128), lora=(4096, 4096, 16), window=255, block=128,
                seqlens=(1000, 37, 600, 411), gqa_kv=4),
    "tiny": dict(attn=(1, 2, 2, 40, 16), decode=(2, 4, 2, 70, 16), linear=(1, 2, 40, 16),
                 lora=(24, 32, 4), window=8, block=16, seqlens=(9, 2, 23), gqa_kv=1),
}


def _tolerance(dtype: torch.dtype, lowp_err: float, ref_mag: float, factor: float) -> float:
    if dtype in (torch.float32, torch.float64):
        return 2e-5 * max(1.0, ref_mag) * factor
    return factor * lowp_err + 4 * torch.finfo(dtype).eps * max(1.0, ref_mag)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    return float(d.max()) if d.numel() else 0.0  # NaN propagates: a NaN error fails


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor,
            dtype: torch.dtype) -> dict:
    """One quantity's record: ``err`` (Triton vs the fp32 reference), ``tol``, ``ok``."""
    factor = 2.0 if name in ("o", "lse") else 3.0
    mag = float(ref.detach().abs().nan_to_num(posinf=0.0, neginf=0.0).max()) if ref.numel() else 0.0
    err, tol = _err(got, ref), _tolerance(dtype, _err(lowp, ref), mag, factor)
    return {"err": err, "tol": tol, "ok": err <= tol}  # False for a NaN error


def _three_ways(run: Callable, inputs: list[torch.Tensor], grad: bool, dtype: torch.dtype,
                fixed: tuple[int, ...] = ()) -> dict:
    """``run(backend, tensors) -> outputs`` on Triton (``dtype``), torch (fp32) and torch
    (``dtype``); with ``grad`` also the gradients of every input but those at ``fixed``, for one
    random cotangent. Inputs and cotangent are rounded to ``dtype`` first, so all three runs see
    the same values."""
    results = {}
    for label, backend, dt in (("got", "triton", dtype), ("ref", "torch", torch.float32),
                               ("lowp", "torch", dtype)):
        ts = [t.detach().to(dtype).to(dt).requires_grad_(grad and i not in fixed)
              for i, t in enumerate(inputs)]
        outs = run(backend, ts)
        outs = outs if isinstance(outs, tuple) else (outs,)
        values = {n: o for n, o in zip(("o", "lse"), outs, strict=False)}
        if grad:
            leaves = [t for t in ts if t.requires_grad]
            g = torch.Generator(device="cpu").manual_seed(1)
            do = torch.randn(outs[0].shape, generator=g).to(dtype).to(outs[0])
            grads = torch.autograd.grad(outs[0], leaves, do)
            values.update({f"d{i}": x for i, x in enumerate(grads)})
        results[label] = values
    return {n: compare(n, results["got"][n], results["ref"][n], results["lowp"][n], dtype)
            for n in results["got"]}


def _randn(*shape, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device)


def _attention(pattern_fn, grad=True, seqlens=False, padding=False, mods=False):
    def check(device, dtype, size):
        import attnkit

        s = SIZES[size]
        B, Hq, Hkv, N, D = s["attn"]
        if mods:
            Hkv = s["gqa_kv"]
        kw = {}
        if seqlens:
            lens = list(s["seqlens"])
            B, N = 1, sum(lens)
            kw["cu_seqlens"] = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()],
                                            dtype=torch.int32, device=device)
            kw["max_seqlen"] = max(lens)
        if padding:
            mask = torch.ones(B, N, dtype=torch.bool, device=device)
            mask[0, N - N // 3:] = False
            kw["valid_keys"] = mask
        inputs = [_randn(B, Hq, N, D, device=device, seed=1), _randn(B, Hkv, N, D, device=device, seed=2),
                  _randn(B, Hkv, N, D, device=device, seed=3)]
        if mods:
            kw.update(softcap=30.0, alibi_slopes=torch.linspace(0.01, 0.1, Hq, device=device))
            inputs.append(_randn(Hq, device=device, seed=4))  # sinks (with a gradient)
        pattern = pattern_fn(N, s)

        def run(backend, ts):
            extra = dict(kw)
            if mods:
                extra["sinks"] = ts[3]
            return attnkit.attention(ts[0], ts[1], ts[2], pattern, backend=backend, **extra)

        return _three_ways(run, inputs, grad, dtype)

    return check


def _decode(device, dtype, size):
    import attnkit

    B, Hq, Hkv, Nk, D = SIZES[size]["decode"]
    mask = torch.ones(B, Nk, dtype=torch.bool, device=device)
    mask[1, Nk // 2:] = False
    inputs = [_randn(B, Hq, 1, D, device=device, seed=1), _randn(B, Hkv, Nk, D, device=device, seed=2),
              _randn(B, Hkv, Nk, D, device=device, seed=3)]

    def run(backend, ts):
        with torch.no_grad():
            return attnkit.attention(*ts, attnkit.Causal(), valid_keys=mask, backend=backend,
                                     return_lse=True)

    return _three_ways(run, inputs, False, dtype)


def _linear(device, dtype, size):
    import attnkit

    B, H, N, D = SIZES[size]["linear"]
    inputs = [_randn(B, H, N, D, device=device, seed=s) * 0.5 for s in (1, 2, 3)]
    return _three_ways(lambda backend, ts: attnkit.linear_attention(*ts, backend=backend),
                       inputs, True, dtype)


def _hybrid(device, dtype, size):
    """The sliding-window + linear hybrid (Triton: the flash window part and the shifted linear
    part), with a decay, against the torch path."""
    import attnkit

    B, H, N, D = SIZES[size]["linear"]
    inputs = [_randn(B, H, N, D, device=device, seed=s) * 0.5 for s in (1, 2, 3)]
    w = max(2, min(SIZES[size]["window"], N // 2))
    return _three_ways(lambda backend, ts: attnkit.linear_attention(*ts, window=w, decay=0.99,
                                                                    backend=backend),
                       inputs, True, dtype)


def _lora(device, dtype, size):
    import attnkit

    T, h, r = SIZES[size]["lora"]
    x = _randn(T, h, device=device, seed=1)
    w = _randn(h, h, device=device, seed=2) / h ** 0.5
    a = _randn(r, h, device=device, seed=3) / h ** 0.5
    b = _randn(h, r, device=device, seed=4) * 0.1

    def run(backend, ts):
        return attnkit.lora_linear(ts[0], ts[1], ts[2], ts[3], 2.0, backend=backend)

    return _three_ways(run, [x, w, a, b], True, dtype, fixed=(1,))  # the frozen weight


def _bigbird(n, s):
    import attnkit

    return attnkit.bigbird(n, s["block"])


#: (name, check(device, dtype, size) -> {quantity: record}), in the order they run: one check of
#: each kernel family first (a short budget still sees every kernel compile and run once), then
#: the flash kernels' variants.
CHECKS: list[tuple[str, Callable]] = [
    ("flash dense fwd+bwd", _attention(lambda n, s: None)),
    ("decode (split-KV, key padding)", _decode),
    ("linear attention fwd+bwd", _linear),
    ("LoRA linear fwd+bwd", _lora),
    ("linear hybrid (window + linear, decay) fwd+bwd", _hybrid),
    ("flash causal fwd+bwd", _attention(lambda n, s: _causal())),
    ("flash window fwd+bwd", _attention(lambda n, s: _window(s["window"]))),
    ("flash block-sparse (BigBird) fwd+bwd", _attention(_bigbird)),
    ("flash varlen causal fwd+bwd", _attention(lambda n, s: _causal(), seqlens=True)),
    ("flash key padding causal fwd+bwd", _attention(lambda n, s: _causal(), padding=True)),
    ("flash score mods (softcap, sinks, ALiBi; GQA) fwd+bwd",
     _attention(lambda n, s: _causal(), mods=True)),
]


def _causal():
    import attnkit

    return attnkit.Causal()


def _window(w):
    import attnkit

    return attnkit.SlidingWindow(w)


def run_smoke(path: Path, deadline: float, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
              size: str = "gpu", checks: list[tuple[str, Callable]] | None = None,
              clock: Callable[[], float] = time.time, log: Callable[[str], None] = print) -> dict:
    """Run ``checks`` (default :data:`CHECKS`) in order until ``deadline`` (``clock()`` time),
    rewriting ``path`` (JSON) after each. A check that raises is recorded as ``error`` with the
    exception; those past the deadline as ``skipped``. Returns the document written."""
    doc = {"device": device, "dtype": str(dtype).replace("torch.", ""), "size": size, "checks": []}
    for name, check in (CHECKS if checks is None else checks):
        t0 = clock()
        record: dict = {"name": name}
        if t0 >= deadline:
            record.update(status="skipped", reason="the smoke's time budget ran out")
        else:
            try:
                quantities = check(device, dtype, size)
                bad = [q for q, r in quantities.items() if not r["ok"]]
                record.update(status="fail" if bad else "ok", quantities=quantities)
                if bad:
                    record["reason"] = ", ".join(
                        f"{q}: error {quantities[q]['err']:.3g} > {quantities[q]['tol']:.3g}"
                        for q in bad)
            except Exception as e:  # noqa: BLE001 - every failure is a result here
                record.update(status="error", reason=f"{type(e).__name__}: {e}"[:2000])
            record["seconds"] = round(clock() - t0, 2)
        doc["checks"].append(record)
        doc["counts"] = {s: sum(c["status"] == s for c in doc["checks"])
                         for s in ("ok", "fail", "error", "skipped")}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        log(f"smoke: {name}: {record['status']}"
            + (f" ({record['seconds']} s)" if "seconds" in record else "")
            + (f": {record['reason']}" if record.get("reason") else ""))
    return doc
