"""Capture the kernel launches the launchers really make, without a GPU and without running them.

:func:`capture` replaces ``JITFunction.run`` and ``Autotuner.run`` for the duration of a ``with``
block (the interpreter must be off: under ``TRITON_INTERPRET=1`` kernels are
``InterpretedFunction`` objects and never reach these methods). Every ``kernel[grid](...)`` call
then lands here instead of compiling:

* a plain launch is recorded once, with its ``num_warps``/``num_stages``;
* an autotuned launch runs Triton's own ``prune_configs`` (so the launchers' ``early_config_prune``
  functions run exactly as Triton calls them) and is recorded once per config left, in order;
  the first one is what ``ATTNKIT_AUTOTUNE=0`` runs.

Each record keeps every kernel parameter bound to the value the launch passed (a tensor is kept as
a :class:`Pointer`: its dtype and whether its address is 16-byte aligned, which is all Triton
specialises on), so records pickle and compile in another process. :func:`launch_problems` checks
the plumbing (each parameter given exactly once, grids within CUDA's limits).

:func:`fake_cuda` lets the Triton backends take CPU tensors (they refuse them otherwise): nothing
is computed, so the launchers' outputs stay ``torch.empty`` garbage and only the launches count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

#: Keyword arguments of a launch that are compile options, not kernel parameters.
LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion",
                            "launch_cooperative_grid", "launch_pdl", "debug"})


@dataclass(frozen=True)
class Pointer:
    """A tensor argument as Triton sees it: element type (``"bf16"``...) and 16-byte alignment."""

    dtype: str
    aligned: bool


@dataclass
class Launch:
    """One captured launch at one config: ``args`` maps every kernel parameter (constexprs
    included, autotuner config values merged in) to its value."""

    kernel: str  # "flash.kernels_fwd:_fwd_kernel" (the module's last two parts: two ops have _fwd_kernel)
    fn: object = field(repr=False)  # the JITFunction (not pickled: see __getstate__)
    args: dict
    num_warps: int
    num_stages: int
    tuned: bool  # launched through an autotuner
    first: bool  # the first config offered (or the only one): what ATTNKIT_AUTOTUNE=0 runs
    config: dict  # the autotuner config's kwargs (empty for a plain launch)
    grid: tuple
    case: dict = field(default_factory=dict)  # what the public call was (op, head_dim, dtype...)
    raw: tuple | None = field(default=None, repr=False)  # (args, kwargs) as launched, if kept

    def __getstate__(self):
        state = dict(self.__dict__)
        state["fn"] = (self.fn.fn.__module__, self.fn.fn.__name__)
        state["raw"] = None  # tensors stay in the capturing process
        return state

    def __setstate__(self, state):
        import importlib

        module, name = state["fn"]
        state["fn"] = _unwrap(getattr(importlib.import_module(module), name))
        self.__dict__.update(state)


def _unwrap(fn):
    """The ``JITFunction`` inside an ``Autotuner``/``Heuristics`` wrapper (or ``fn`` itself)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def label(jit) -> str:
    """``"op.module:kernel"``: flash and linear attention both have a ``_fwd_kernel``."""
    return ".".join(jit.fn.__module__.split(".")[-2:]) + ":" + jit.fn.__name__


def _dtype_name(t) -> str:
    """Triton's name for a tensor's element type ("bf16", "fp32", "i32", "u8", "u1"...)."""
    try:
        from triton._utils import type_canonicalisation_dict as canon
    except ImportError:  # older Triton: the same names, spelled out here
        canon = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
                 "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8",
                 "bool": "u1"}
    name = str(t.dtype).split(".")[-1]
    return canon.get(name, name)


def _as_value(v):
    if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
        return Pointer(_dtype_name(v), v.data_ptr() % 16 == 0)
    return v


class Recorder:
    """What one :func:`capture` block saw: ``launches`` and plumbing ``problems``."""

    def __init__(self, keep_raw: bool = False):
        self.keep_raw = keep_raw  # keep each launch's own (args, kwargs), tensors included
        self.launches: list[Launch] = []
        self.problems: list[str] = []
        self.case: dict = {}

    def _record(self, jit, name, args, kwargs, grid, config, tuned, first):
        self.problems += launch_problems(jit, name, args, kwargs, grid, config.kwargs if config
                                         else {})
        params = [p.name for p in jit.params]
        bound = dict(zip(params, args, strict=False))  # fewer positional than params
        meta = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
        bound.update(meta)
        if config is not None:
            bound.update(config.kwargs)
        for p in jit.params:  # defaults the launch relied on
            if p.name not in bound and p.has_default:
                bound[p.name] = p.default
        opts = {"num_warps": 4, "num_stages": 3, **{k: kwargs[k] for k in LAUNCH_OPTIONS
                                                    if k in kwargs}}
        if config is not None:
            opts.update(num_warps=config.num_warps, num_stages=config.num_stages,
                        maxnreg=getattr(config, "maxnreg", None),
                        num_ctas=getattr(config, "num_ctas", 1))
        # the compile jobs carry num_warps/num_stages only: say so if a launch sets more
        unsupported = {k: v for k, v in opts.items()
                       if k not in ("num_warps", "num_stages", "debug")
                       and v not in (None, 1 if k == "num_ctas" else None)}
        if unsupported:
            self.problems.append(f"{name}: launch options {unsupported} are not compiled by "
                                 "compile_check (accepted: num_warps, num_stages)")
        g = grid(bound) if callable(grid) else grid
        raw = None
        if self.keep_raw:
            raw = (args, {**kwargs, **(config.kwargs if config is not None else {}),
                          "num_warps": opts["num_warps"], "num_stages": opts["num_stages"]})
        self.launches.append(Launch(
            kernel=name, fn=jit, args={k: _as_value(v) for k, v in bound.items()},
            num_warps=opts["num_warps"], num_stages=opts["num_stages"], tuned=tuned, first=first,
            config=dict(config.kwargs) if config is not None else {},
            grid=tuple(int(d) for d in g), case=dict(self.case), raw=raw))


def launch_problems(jit, name, args, kwargs, grid, config_kwargs) -> list[str]:
    """What is wrong with one launch of ``jit``: a parameter given twice (positionally, by keyword
    or by the autotuner's config) or never, a name that is no parameter, a grid over CUDA's
    limits (x < 2**31, y and z <= 65535). Empty when the launch is sound."""
    problems = []
    names = [p.name for p in jit.params]
    given = names[:len(args)]
    if len(args) > len(names):
        problems.append(f"{name}: {len(args)} positional arguments for {len(names)} parameters")
    meta = [k for k in kwargs if k not in LAUNCH_OPTIONS]
    twice = ((set(given) & set(meta)) | (set(given) & set(config_kwargs))
             | (set(meta) & set(config_kwargs)))
    if twice:
        problems.append(f"{name}: given twice: {sorted(twice)}")
    unknown = [k for k in (*meta, *config_kwargs) if k not in names]
    if unknown:
        problems.append(f"{name}: not kernel parameters: {sorted(unknown)}")
    covered = set(given) | set(meta) | set(config_kwargs)
    missing = [p.name for p in jit.params if p.name not in covered and not p.has_default]
    if missing:
        problems.append(f"{name}: parameters never given: {missing}")
    full = {**dict(zip(names, args, strict=False)), **kwargs, **config_kwargs}
    g = tuple(grid(full) if callable(grid) else grid)
    if not g or len(g) > 3 or any(int(d) < 0 for d in g):
        problems.append(f"{name}: bad grid {g}")
        return problems
    g = tuple(int(d) for d in g) + (1,) * (3 - len(g))
    if g[0] >= 2**31 or g[1] > 65535 or g[2] > 65535:
        problems.append(f"{name}: grid {g} is over CUDA's limits")
    return problems


@contextlib.contextmanager
def capture(keep_raw: bool = False):
    """Intercept every Triton launch inside the block; yields the :class:`Recorder`
    (``keep_raw``: also keep each launch's own arguments, for :func:`.compile.triton_job`)."""
    import os

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("capture needs TRITON_INTERPRET unset: under the interpreter kernels "
                           "are InterpretedFunction objects and their launches cannot be seen")
    rec = Recorder(keep_raw)

    def jit_run(self, *args, grid, warmup=False, **kwargs):
        rec._record(self, label(self), args, kwargs, grid, None, tuned=False, first=True)

    def tuned_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        configs = self.prune_configs(kwargs)  # Triton's own call of our early_config_prune
        jit = _unwrap(self.fn)
        if not configs:
            rec.problems.append(f"{label(jit)}: every config pruned")
        for i, c in enumerate(configs):
            rec._record(jit, label(jit) + "[tuned]", args, kwargs, grid, c, tuned=True,
                        first=i == 0)

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuned_run
    try:
        yield rec
    finally:
        JITFunction.run, Autotuner.run = saved


@contextlib.contextmanager
def fake_cuda():
    """Let the Triton backends accept CPU tensors: dispatch asks
    ``dispatch.tensor_device_reason`` whether a Triton kernel can take a tensor."""
    from .. import dispatch

    saved = dispatch.tensor_device_reason
    dispatch.tensor_device_reason = lambda t: None
    try:
        yield
    finally:
        dispatch.tensor_device_reason = saved
