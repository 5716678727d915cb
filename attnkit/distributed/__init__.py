"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

``import attnkit.distributed`` is the entry point:

* :func:`context_parallel_attention`: each rank passes its ``[B, H, N / world, D]`` shard of
  ``q``, ``k``, ``v`` and gets its output rows (forward and backward, any attnkit softmax
  pattern, GQA, key padding);
* :func:`shard` / :func:`unshard`: cut a full tensor into this rank's piece / gather it back;
* :func:`plan`: the host-side plan (pairs computed, ranks sent to, bytes) for a pattern;
* :mod:`attnkit.distributed.hf` registers ``attn_implementation="attnkit_cp"`` with transformers.
"""

from .comm import shard, unshard
from .planner import LAYOUTS, Pair, Plan, plan
from .ring import context_parallel_attention, merge_partial

__all__ = ["context_parallel_attention", "shard", "unshard", "plan", "Plan", "Pair", "LAYOUTS",
           "merge_partial"]
