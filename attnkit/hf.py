"""Hugging Face transformers integration (see :mod:`attnkit.attn.hf`).

Importing this module registers ``attn_implementation="attnkit"`` with transformers'
``AttentionInterface`` and ``AttentionMaskInterface``.
"""

from .attn.hf import *  # noqa: F403
from .attn.hf import __all__  # noqa: F401
