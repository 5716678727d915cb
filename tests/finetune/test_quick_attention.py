"""``attnkit finetune --quick`` runs attnkit's attention (a window) unless ``--attention`` says
otherwise; :meth:`FinetuneConfig.quick` itself keeps the model's attention."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("transformers")

from attnkit.finetune.cli import add_arguments, config_from_args  # noqa: E402
from attnkit.finetune.config import QUICK_ATTENTION, FinetuneConfig, parse_attention  # noqa: E402


def _config(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


def test_quick_demo_swaps_to_attnkit_attention_and_flags_win():
    assert parse_attention(QUICK_ATTENTION).kind == "sliding"
    assert _config("--quick").attention == QUICK_ATTENTION
    assert _config("--quick", "--attention", "model").attention == "model"
    assert _config().attention == "model"  # without --quick: the model's own attention
    assert FinetuneConfig.quick().attention == "model"
