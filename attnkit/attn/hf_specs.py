"""Moved to :mod:`attnkit.attn.hf.specs` and :mod:`attnkit.attn.hf.persist`; this name stays for
code that imports it (``attnkit.finetune.train``)."""

from .hf.persist import CONFIG_KEY, spec_from_json, spec_to_json  # noqa: F401
from .hf.specs import LinearAttention, Spec, check_spec, model_pattern  # noqa: F401
