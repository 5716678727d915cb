"""The failure-mode detector on synthetic loss / gradient-norm sequences (no training)."""

from __future__ import annotations

import math
import random

import pytest

from attnkit.finetune import diagnostics as dg
from attnkit.finetune.diagnostics import SignatureDetector

#: (loss, grad_norm) as logged by ``attnkit finetune --quick`` (steps 1, 5, 10, ..., 150) on a
#: 2-core CPU, and its eval losses at steps 50, 100, 150: a healthy run (clipping trims about
#: half the steps slightly: norms up to 1.26 against --max-grad-norm 1.0).
QUICK_TRAIN = [
    (7.636, 0.9371), (7.556, 0.9924), (6.959, 0.9223), (6.171, 0.4443), (5.946, 0.3983), (5.739, 0.5761),
    (5.677, 0.7168), (5.451, 0.7301), (5.219, 0.7629), (4.855, 0.8161), (4.777, 0.9137), (4.781, 0.9682),
    (4.307, 0.9518), (4.006, 0.9922), (4.164, 1.158), (3.787, 1.119), (3.78, 1.085), (3.553, 1.259),
    (3.659, 1.22), (3.621, 1.097), (3.618, 1.199), (3.381, 1.124), (3.472, 1.231), (3.104, 1.256),
    (2.998, 1.102), (3.282, 1.091), (3.273, 1.235), (3.144, 1.124), (3.135, 1.079), (3.157, 0.9832),
    (2.927, 1.248)]
QUICK_EVAL = {50: 4.551, 100: 3.325, 150: 3.073}


def _feed(det, losses, grads=None, steps=None, evals=None):
    """Feed train losses (and eval losses keyed by step) in step order; returns all diagnoses."""
    steps = steps or list(range(1, len(losses) + 1))
    evals = evals or {}
    for i, (step, loss) in enumerate(zip(steps, losses, strict=True)):
        det.observe_train(step, loss, None if grads is None else grads[i])
        if step in evals:
            det.observe_eval(step, evals[step])
    return det.diagnoses


def _kinds(diagnoses):
    return [d.kind for d in diagnoses]


def test_the_quick_run_shows_no_signature():
    det = SignatureDetector(max_grad_norm=1.0, warmup_steps=10)
    steps = [1] + list(range(5, 151, 5))
    got = _feed(det, [v for v, _ in QUICK_TRAIN], [g for _, g in QUICK_TRAIN], steps, QUICK_EVAL)
    assert got == [] and det.stop_reason is None
    # the same run with clipping at 0.5 would be cut by more than 1.5x on most late steps
    det = SignatureDetector(max_grad_norm=0.5, warmup_steps=10)
    got = _feed(det, [v for v, _ in QUICK_TRAIN], [g for _, g in QUICK_TRAIN], steps, QUICK_EVAL)
    assert _kinds(got) == ["clipping_most_steps"]


def test_a_spike_is_reported_once_with_its_evidence():
    rng = random.Random(0)
    losses = [3.0 + rng.uniform(-0.03, 0.03) for _ in range(12)] + [5.0] + [3.0] * 3 + [6.0]
    det = SignatureDetector(warmup_steps=100)  # a flat start: keep the plateau check out of it
    got = _feed(det, losses)
    assert _kinds(got) == ["loss_spike"]
    d = got[0]
    assert d.step == 13 and d.evidence["loss"] == 5.0 and d.evidence["sigmas"] > dg.SPIKE_SIGMAS
    assert d.evidence["window"] == dg.SPIKE_WINDOW and "step 13: loss spike" in d.message
    assert det.stop_reason is None  # a spike is reported, not a reason to stop


def test_a_small_rise_in_a_flat_window_is_not_a_spike():
    # many standard deviations up, but only 5% up: below SPIKE_MIN_RISE
    losses = [3.0 + 0.001 * (i % 2) for i in range(10)] + [3.15]
    assert _feed(SignatureDetector(warmup_steps=100), losses) == []
    # a steadily falling loss that bounces back by a few percent: no spike either
    losses = [6.0 - 0.2 * i for i in range(15)] + [3.5]
    assert _feed(SignatureDetector(), losses) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_stops(bad):
    det = SignatureDetector()
    got = _feed(det, [4.0, 3.9, 3.8, bad])
    assert _kinds(got) == ["non_finite_loss"] and det.stop_reason == dg.NON_FINITE_STATUS
    assert got[0].step == 4 and got[0].evidence["last_finite_step"] == 3
    assert [s for s, _ in det.train] == [1, 2, 3]


def test_overfitting_needs_a_rising_eval_loss_and_a_falling_train_loss():
    losses = [4.0 - 0.05 * i for i in range(40)]
    evals = {10: 3.6, 20: 3.3, 30: 3.32, 40: 3.4}
    det = SignatureDetector()
    got = _feed(det, losses, evals=evals)
    assert _kinds(got) == ["overfitting"] and got[0].step == 40
    ev = got[0].evidence
    assert ev["best_eval_step"] == 20 and ev["train_loss_now"] < ev["train_loss_then"]
    # the eval loss rises less than OVERFIT_RISE above its minimum: not yet
    assert _feed(SignatureDetector(), losses, evals={10: 3.6, 20: 3.3, 30: 3.31, 40: 3.32}) == []
    # one noisy bump, then down again: not yet
    assert _feed(SignatureDetector(), losses, evals={10: 3.6, 20: 3.3, 30: 3.5, 40: 3.45}) == []
    # eval and train both rising: diverging, not over-fitting
    rising = [3.0 + 0.05 * i for i in range(40)]
    assert "overfitting" not in _kinds(_feed(SignatureDetector(), rising, evals=evals))


def test_an_early_plateau_at_the_starting_loss():
    flat = [5.70 + 0.005 * ((i * 7) % 3) for i in range(20)]
    det = SignatureDetector(warmup_steps=2)
    got = _feed(det, flat)
    assert _kinds(got) == ["plateau"]
    assert got[0].step == 2 + dg.PLATEAU_LOGS  # checked once PLATEAU_LOGS losses follow the warm-up
    # falling by more than PLATEAU_REL_DROP: no plateau; rising: no plateau (not this signature)
    assert _feed(SignatureDetector(warmup_steps=2), [5.7 - 0.03 * i for i in range(20)]) == []
    assert "plateau" not in _kinds(_feed(SignatureDetector(warmup_steps=2),
                                         [5.7 + 0.1 * i for i in range(20)]))
    # a loss that fell a lot and then flattens is not "stuck where it started"
    assert _feed(SignatureDetector(warmup_steps=2), [7.0, 6.0, 5.0] + [4.0] * 17) == []


def test_vanishing_gradients():
    grads = [1.0, 0.8, 0.9] + [1e-5] * 6
    det = SignatureDetector()
    got = _feed(det, [3.0 - 0.1 * i for i in range(len(grads))], grads)
    assert _kinds(got) == ["vanishing_gradients"]
    assert got[0].step == 3 + dg.VANISH_LOGS and got[0].evidence["peak_grad_norm"] == 1.0
    # small but not 1000x smaller than the peak: fine
    ok = [1.0, 0.8] + [5e-3] * 10
    assert _feed(SignatureDetector(), [3.0 - 0.1 * i for i in range(len(ok))], ok) == []


def test_clipping_on_most_steps():
    losses = [4.0 - 0.05 * i for i in range(20)]
    heavy = [3.0 if i % 4 else 0.9 for i in range(20)]  # 3x the limit on 3 of 4 steps
    got = _feed(SignatureDetector(max_grad_norm=1.0), losses, heavy)
    assert _kinds(got) == ["clipping_most_steps"] and got[0].step == dg.CLIP_MIN_LOGS
    assert got[0].evidence["clipped_steps"] > dg.CLIP_FRACTION * got[0].evidence["window"]
    # mild clipping on every step (norm 1.3 against 1.0) is clipping doing its job
    assert _feed(SignatureDetector(max_grad_norm=1.0), losses, [1.3] * 20) == []
    # without a clipping norm there is nothing to check
    assert _feed(SignatureDetector(max_grad_norm=None), losses, heavy) == []


def test_the_callback_stops_training_without_saving_on_a_non_finite_loss(capsys):
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState

    det = SignatureDetector()
    cb = dg.signature_callback(det)
    state, control = TrainerState(), TrainerControl()
    for step, loss in ((1, 4.0), (2, 3.9)):
        state.global_step = step
        cb.on_log(None, state, control, logs={"loss": loss, "grad_norm": 0.5})
    assert not control.should_training_stop
    state.global_step = 3
    control.should_save = control.should_evaluate = True  # as DefaultFlowCallback sets them
    cb.on_log(None, state, control, logs={"loss": float("nan"), "grad_norm": float("nan")})
    assert control.should_training_stop and not control.should_save and not control.should_evaluate
    err = capsys.readouterr().err
    assert err.count("attnkit finetune: diagnosis: step 3: non-finite training loss") == 1, err
