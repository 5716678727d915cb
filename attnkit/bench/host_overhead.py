"""``attnkit bench --host-overhead``: the host (Python) time of one ``attnkit.attention`` call on the
Triton path, layer by layer, with every kernel launch stubbed (runs on the CPU, no GPU needed).

What is stubbed: ``JITFunction.run`` and ``Autotuner.run`` return at once (Triton's own launcher,
the driver and the GPU come on top on a real machine), and the Triton backends accept CPU tensors
(:func:`attnkit.kernels.compile_check.capture.fake_cuda`). Everything of attnkit's runs as it
would on a GPU: the call-signature cache (``attn/functional.py``), validation, the dispatch,
:class:`FlashArgs`, autograd, the launch plan, the output allocations (CPU ``torch.empty`` here)
and the kernels' ``kernel.run(...)`` argument plumbing. The headline figure is a call of a
signature already seen (every call of a training step after the first); the first call's layers
are timed too.

Timing: each layer is called ``calls`` times per repeat; a repeat's figure is its thread CPU time
per call (``time.thread_time``: time the 2-core shared machine spends running other processes is
not counted), and the reported figure is the median over ``repeats``. Layers are timed
separately, so ``autograd`` and ``other`` are differences of medians (approximate).
``_fwd_impl`` and ``uncached`` allocate their outputs too.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["stubbed_launches", "time_call", "measure", "format_report", "TARGETS_US"]

#: Issue 16's targets (us per call, stubbed launches): a training forward and a no-grad forward.
TARGETS_US = {"train": 40.0, "no_grad": 25.0}


@contextlib.contextmanager
def stubbed_launches():
    """Inside the block every Triton launch returns at once and Triton backends take CPU tensors.
    Needs ``TRITON_INTERPRET`` unset (under the interpreter kernels never reach ``run``)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("--host-overhead needs TRITON_INTERPRET unset: the interpreter takes "
                           "other launch paths (fixed tiles, no autotuner), which would be timed")
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from ..kernels.compile_check.capture import fake_cuda

    def no_launch(self, *args, **kwargs):
        return None

    saved = JITFunction.run, Autotuner.run
    JITFunction.run = Autotuner.run = no_launch
    try:
        with fake_cuda():
            yield
    finally:
        JITFunction.run, Autotuner.run = saved


def time_call(fn: Callable[[], object], calls: int, repeats: int,
              clock: Callable[[], float] = time.thread_time) -> float:
    """Median over ``repeats`` of ``clock`` seconds per call of ``fn``, in microseconds (after
    ``calls // 10`` warm-up calls)."""
    for _ in range(max(1, calls // 10)):
        fn()
    per_call = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        per_call.append((clock() - t0) / calls * 1e6)
    return statistics.median(per_call)


def _layers(q, k, v, pattern) -> dict[str, Callable[[], object]]:
    """The layers of one call, outermost first, as thunks on fixed inputs: the cached path that
    every call of a seen signature takes, then the full path of a signature's first call."""
    import attnkit

    from ..attn import functional
    from ..attn.inputs import validate
    from ..kernels.dispatch import select_backend
    from ..kernels.flash.backends import BACKENDS
    from ..kernels.flash.launch import FlashArgs, FlashPlan, _fwd_impl, _Launch
    from ..kernels.flash.op import flash_attention

    attnkit.attention(q, k, v, pattern, backend="triton")  # the signature's plan is built here
    key = functional.plan_key(q, k, v, pattern, None, None, False, None, None, None, "triton")
    plan = functional._PLANS[key]
    call = plan.call.bind(plan.fields, q, k, v, None, None, None)
    flash_attention(call)  # the launch plan in the call's slot
    fplan = call.launch_slot.plan
    full = validate(q, k, v, pattern, None, None, None, None, False)
    a = FlashArgs.from_call(full)
    return {
        "attention": lambda: attnkit.attention(q, k, v, pattern, backend="triton"),
        "plan_key": lambda: functional._PLANS.get(functional.plan_key(
            q, k, v, pattern, None, None, False, None, None, None, "triton")),
        "bind": lambda: plan.call.bind(plan.fields, q, k, v, None, None, None),
        "dispatch": lambda: plan.dispatch.select(call),
        "flash_attention": lambda: flash_attention(call),
        "plan.forward": lambda: fplan.forward(q, k, v),
        # a signature's first call (and every packed call): the full path
        "validate": lambda: validate(q, k, v, pattern, None, None, None, None, False),
        "select_backend": lambda: select_backend(full, "triton", BACKENDS, op="attention"),
        "FlashArgs": lambda: FlashArgs.from_call(full),
        "FlashPlan": lambda: FlashPlan(a),
        "_Launch": lambda: _Launch(a),
        "_fwd_impl": lambda: _fwd_impl(a),
        "uncached": lambda: flash_attention(full),
        # for comparison: the torch.library op path that torch.compile takes
        "custom_op": lambda: flash_attention(full, use_op=True),
    }


def measure(shape=(2, 16, 512, 128), dtype=torch.bfloat16, calls: int = 1000, repeats: int = 7,
            clock: Callable[[], float] = time.thread_time) -> dict:
    """Microseconds per call of each layer, for a training forward (``requires_grad`` inputs),
    a no-grad forward and a training forward + backward; causal attention of ``shape``."""
    from ..attn.patterns import Causal

    B, H, N, D = shape
    out: dict = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "calls": calls,
                 "repeats": repeats, "clock": getattr(clock, "__name__", "clock"), "modes": {}}
    with stubbed_launches():
        for mode in ("train", "no_grad"):
            q, k, v = (torch.randn(B, H, N, D, dtype=dtype, requires_grad=mode == "train")
                       for _ in range(3))
            us = {name: time_call(fn, calls, repeats, clock)
                  for name, fn in _layers(q, k, v, Causal()).items()}
            us["autograd"] = us["flash_attention"] - us["plan.forward"]
            us["other"] = (us["attention"] - us["plan_key"] - us["bind"] - us["dispatch"]
                           - us["flash_attention"])
            out["modes"][mode] = {n: round(x, 2) for n, x in us.items()}
        q, k, v = (torch.randn(B, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.ones(B, H, N, D, dtype=dtype)

        def step():
            import attnkit

            torch.autograd.grad(attnkit.attention(q, k, v, Causal(), backend="triton"), (q, k, v), do)

        out["modes"]["train_fwd_bwd"] = {"attention+backward": round(
            time_call(step, max(1, calls // 4), repeats, clock), 2)}
    out["targets_us"] = dict(TARGETS_US)
    out["meets_targets"] = {m: out["modes"][m]["attention"] <= t for m, t in TARGETS_US.items()}
    return out


#: Rows of the report, with what each layer is.
_ROWS = (
    ("attention", "attnkit.attention(q, k, v, Causal(), backend='triton'), a seen signature"),
    ("plan_key", "  functional.plan_key() + the cache lookup (inputs.call_signature)"),
    ("bind", "  AttentionCall.bind(): the validated fields + this call's tensors"),
    ("dispatch", "  DispatchPlan.select(): the dispatch replayed"),
    ("flash_attention", "  op.py flash_attention(): autograd + the launch plan"),
    ("autograd", "    autograd (flash_attention - plan.forward)"),
    ("plan.forward", "    launch.py FlashPlan.forward(): outputs, kernel.run(...)"),
    ("other", "  the rest (attention - the four above)"),
    ("validate", "first call of a signature: attn/inputs.py validate()"),
    ("select_backend", "  select_backend(): the full dispatch"),
    ("FlashArgs", "  FlashArgs.from_call()"),
    ("FlashPlan", "  FlashPlan(): the launch plan built (incl. _Launch)"),
    ("_Launch", "    _Launch(): the kernels' shared arguments"),
    ("_fwd_impl", "  _fwd_impl(): a plan built and used once (the custom op's launcher)"),
    ("uncached", "  flash_attention() of a call without a plan slot"),
    ("custom_op", "for comparison: via torch.ops.attnkit.flash_attn_fwd (torch.compile's path)"),
)


def format_report(result: dict) -> str:
    """The table ``attnkit bench --host-overhead`` prints."""
    m = result["modes"]
    lines = [f"host time per call, us (median of {result['repeats']} x {result['calls']} calls, "
             f"{result['clock']}; kernel launches stubbed), causal {result['shape']} "
             f"{result['dtype']}",
             f"  {'layer':<16} {'train':>8} {'no-grad':>8}  what"]
    for name, what in _ROWS:
        lines.append(f"  {name:<16} {m['train'][name]:>8.1f} {m['no_grad'][name]:>8.1f}  {what}")
    lines.append(f"  training forward + backward: {m['train_fwd_bwd']['attention+backward']:.1f} us")
    for mode, target in result["targets_us"].items():
        ok = "meets" if result["meets_targets"][mode] else "MISSES"
        lines.append(f"  {mode}: {m[mode]['attention']:.1f} us {ok} the target of <= {target:g} us")
    return "\n".join(lines)
