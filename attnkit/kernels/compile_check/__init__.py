"""Ahead-of-time compile facts for attnkit's Triton kernels, without a GPU.

What is measured: for every kernel launch the launchers really make through the public API
(attention forward/backward for each pattern, key padding, varlen, split-KV decode; linear
attention; LoRA linear with and without dropout, multi-adapter LoRA), at every config the
autotuner is offered after Triton's own prune: registers and stack (spill) bytes per thread
(``cuobjdump -res-usage``), shared memory (compile metadata) and SASS instruction counts
(``HGMMA``, ``HMMA``, ``UTMALDG``, ``LDGSTS``), compiled for sm_80 or sm_90 by Triton's bundled
ptxas.

How: :mod:`.capture` intercepts ``JITFunction.run``/``Autotuner.run`` while :mod:`.workload`
drives the public API on CPU tensors (the interpreter off, the Triton backends told CPU tensors
are fine, nothing computed); :mod:`.compile` builds each launch's signature from its argument
values with Triton's specialisation rules and compiles it; :mod:`.report` dedupes, filters,
caches and tabulates; :mod:`.cli` is ``attnkit compile-report``. No launcher argument list or
tile table is copied here: a kernel-signature change is seen at the next capture.
"""

from .capture import Launch, Pointer, capture, fake_cuda, launch_problems
from .compile import SHARED_LIMIT, Usage, compile_job, job_for
from .report import collect, table

__all__ = ["Launch", "Pointer", "capture", "fake_cuda", "launch_problems", "SHARED_LIMIT",
           "Usage", "compile_job", "job_for", "collect", "table"]
