"""Calibration: ECE, the temperature fit, streaming and the token subsample (synthetic logits)."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.finetune.calibration import (
    CalibrationAccumulator,
    expected_calibration_error,
    fit_temperature,
)


def _calibrated(n=20_000, vocab=50, scale=2.0, seed=0):
    """Logits and labels drawn from softmax(logits): a model calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * scale
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)
    return z, y


def _stream(z, y, batch=3000, **kw):
    acc = CalibrationAccumulator(**kw)
    for i in range(0, z.shape[0], batch):
        acc.update(z[i:i + batch], y[i:i + batch])
    return acc.result()


def test_ece_by_hand():
    # two tokens: confidence 0.9 correct (bin 13), confidence ~0.5 wrong (bin 7)
    z = torch.tensor([[math.log(9.0), 0.0], [0.01, 0.0]])
    y = torch.tensor([0, 1])
    conf2 = math.exp(0.01) / (math.exp(0.01) + 1)
    want = 0.5 * abs(1 - 0.9) + 0.5 * abs(0 - conf2)
    assert expected_calibration_error(z, y) == pytest.approx(want, abs=1e-6)  # fp32 softmax
    # all in one bin: |mean accuracy - mean confidence|
    assert expected_calibration_error(z, y, n_bins=1) == pytest.approx(abs(0.5 - (0.9 + conf2) / 2))


def test_a_calibrated_model_fits_temperature_one():
    z, y = _calibrated()
    r = _stream(z, y)
    assert r["tokens"] == 20_000 and r["fit_tokens"] + r["report_tokens"] == 20_000
    assert abs(r["temperature"] - 1.0) < 0.1, r["temperature"]
    assert r["ece"] < 0.03
    # scaling by ~1 changes nothing much on the held-out half
    assert r["nll_scaled"] == pytest.approx(r["nll_report"], abs=5e-3)


def test_an_over_confident_model_is_fixed_by_temperature():
    z, y = _calibrated()
    r = _stream(5 * z, y)  # the same predictions, 5x over-confident
    assert r["temperature"] > 1 and r["temperature"] == pytest.approx(5.0, rel=0.1)
    assert r["ece"] > 0.3 and r["ece_scaled"] < r["ece_report"] / 5
    assert r["nll_scaled"] < r["nll_report"] - 1.0
    assert r["confidence"] > r["accuracy"] + 0.3
    # the bins: confidence > accuracy in every populated bin of the high-confidence half
    bins = r["bins"]
    hi = [i for i, n in enumerate(bins["count"]) if n > 200 and i >= 8]
    assert hi and all(bins["confidence"][i] > bins["accuracy"][i] for i in hi)
    # under-confident (logits / 3): T < 1
    assert _stream(z / 3, y)["temperature"] == pytest.approx(1 / 3, rel=0.1)


def test_streaming_matches_one_pass_and_is_reproducible():
    z, y = _calibrated(n=5000, vocab=30)
    whole = expected_calibration_error(z, y)
    a, b = _stream(z, y, batch=700), _stream(z, y, batch=5000)
    assert a["ece"] == pytest.approx(whole, abs=1e-6) and b["ece"] == pytest.approx(whole, abs=1e-6)
    assert a["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(z, y)), abs=1e-5)
    assert a["bins"] == b["bins"]
    assert _stream(z, y, batch=700) == a  # same seed, same subsample, same fit


def test_the_fit_subsample_is_bounded():
    z, y = _calibrated(n=8000, vocab=40)
    r = _stream(5 * z, y, batch=1000, max_tokens=600)
    assert r["tokens"] == 8000  # ECE and NLL still cover every token
    assert r["fit_tokens"] + r["report_tokens"] == 600
    assert r["temperature"] == pytest.approx(5.0, rel=0.25)
    r = _stream(z, y, batch=1000, max_elements=40 * 100)  # 100 tokens' worth of logits
    assert r["fit_tokens"] + r["report_tokens"] == 100


def test_fit_temperature_finds_the_nll_minimum():
    z, y = _calibrated(n=4000, vocab=20, seed=3)
    t = fit_temperature(2.5 * z, y)
    nll = [float(torch.nn.functional.cross_entropy(2.5 * z / s, y)) for s in (t * 0.9, t, t * 1.1)]
    assert nll[1] < nll[0] and nll[1] < nll[2]


def test_a_temperature_beyond_the_range_stops_at_its_end():
    # labels unrelated to the logits: the NLL keeps falling as T grows (towards uniform)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3000, 30, generator=g) * 3
    y = torch.randint(0, 30, (3000,), generator=g)
    r = _stream(z, y)
    assert r["temperature"] == pytest.approx(20.0) and r["temperature_at_bound"]
    assert not _stream(*_calibrated(n=3000, vocab=30))["temperature_at_bound"]
