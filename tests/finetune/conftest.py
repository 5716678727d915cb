"""Fixtures shared by the fine-tuning tests: a tiny model folder and a text file, made once per
test module."""

from __future__ import annotations

import pytest
from ft_helpers import corpus_sample, make_model_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "notes.txt"
    path.write_text(corpus_sample(12_000), encoding="utf-8")
    return path
