"""Failure-mode signatures of a fine-tuning run, read from the losses and gradient norms it logs.

:class:`SignatureDetector` is fed every logged train loss (with its ``grad_norm``) and every eval
loss, in step order, and reports each signature once, as a :class:`Diagnosis` (kind, step, a
one-line message, the numbers behind it). :func:`signature_callback` wraps it in a
``TrainerCallback`` that prints each diagnosis when it is found and stops the run cleanly on a
non-finite loss (no evaluation and no checkpoint at that step, so the last checkpoint on disk
predates it).

The signatures and their thresholds (the module constants below):

``non_finite_loss``
    a logged train loss that is NaN or infinite. The run stops. (Only the loss counts: with fp16
    the gradient scaler skips steps whose gradients overflow, which is routine.)
``loss_spike``
    a logged train loss more than :data:`SPIKE_SIGMAS` standard deviations above the mean of the
    previous :data:`SPIKE_WINDOW` logged losses (at least :data:`SPIKE_MIN_POINTS` of them) *and*
    at least :data:`SPIKE_MIN_RISE` (relative) above that mean, so that a near-constant window
    (tiny standard deviation) does not make noise look like a spike. Typical cause: the learning
    rate is too high; warm-up and clipping help.
``overfitting``
    the eval loss has risen at :data:`OVERFIT_RISING_EVALS` evaluations in a row (each above the
    one before; one noisy bump is not enough) to at least :data:`OVERFIT_RISE` (relative) above
    the lowest eval loss so far, while the mean of the last :data:`TRAIN_WINDOW` logged train
    losses is below its value when that lowest eval loss was logged.
``plateau``
    checked once, when :data:`PLATEAU_LOGS` train losses have been logged after the warm-up: the
    mean of the later half of them has fallen less than :data:`PLATEAU_REL_DROP` (relative) below
    the first logged loss of the run, and less than that below the mean of the earlier half (and
    has not risen by more than that either: a rising loss is not a plateau). The loss is stuck
    near where it started: a learning rate too low, or no gradient signal.
``vanishing_gradients``
    :data:`VANISH_LOGS` logged gradient norms in a row below :data:`VANISH_RATIO` times the largest
    logged so far (or below :data:`VANISH_ABS`).
``clipping_most_steps``
    over the last :data:`CLIP_WINDOW` logged steps (at least :data:`CLIP_MIN_LOGS`), more than
    :data:`CLIP_FRACTION` of them have ``grad_norm > CLIP_CUT_RATIO * max_grad_norm``: clipping
    removes a third of the update or more on most steps, so the learning rate effectively
    follows the clip, not the schedule. Mild clipping (a norm a little above the limit on many
    steps, as in the ``--quick`` run, whose norms reach 1.26 against a limit of 1.0) is clipping
    doing its job, not a signature.

The Trainer averages the loss over each ``--logging-steps`` window and logs the ``grad_norm`` of
the last step in it; the thresholds count *logged* points, so the same run logged more often
reacts sooner.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import asdict, dataclass, field

__all__ = ["Diagnosis", "SignatureDetector", "signature_callback", "SPIKE_SIGMAS", "SPIKE_WINDOW",
           "SPIKE_MIN_POINTS", "SPIKE_MIN_RISE", "OVERFIT_RISE", "OVERFIT_RISING_EVALS", "TRAIN_WINDOW",
           "PLATEAU_LOGS", "PLATEAU_REL_DROP", "VANISH_RATIO", "VANISH_ABS", "VANISH_LOGS",
           "CLIP_CUT_RATIO", "CLIP_FRACTION", "CLIP_WINDOW", "CLIP_MIN_LOGS", "NON_FINITE_STATUS"]

SPIKE_SIGMAS = 4.0
SPIKE_WINDOW = 10
SPIKE_MIN_POINTS = 5
SPIKE_MIN_RISE = 0.10
OVERFIT_RISE = 0.02
OVERFIT_RISING_EVALS = 2
TRAIN_WINDOW = 5
PLATEAU_LOGS = 8
PLATEAU_REL_DROP = 0.02
VANISH_RATIO = 1e-3
VANISH_ABS = 1e-8
VANISH_LOGS = 5
CLIP_CUT_RATIO = 1.5
CLIP_FRACTION = 0.5
CLIP_WINDOW = 20
CLIP_MIN_LOGS = 10

#: ``summary["status"]`` of a run stopped by a non-finite loss.
NON_FINITE_STATUS = "stopped: non-finite loss"


@dataclass
class Diagnosis:
    kind: str
    step: int
    message: str
    evidence: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


class SignatureDetector:
    """Feed it the logged numbers in step order; each ``observe_*`` returns the new diagnoses.

    ``max_grad_norm``: the clipping norm (``None``/0: no clipping check); ``warmup_steps``: steps
    before the plateau check starts counting.
    """

    def __init__(self, max_grad_norm: float | None = None, warmup_steps: int = 0):
        self.max_grad_norm = max_grad_norm
        self.warmup_steps = warmup_steps
        self.train: list[tuple[int, float]] = []   # (step, loss), finite ones only
        self.grads: list[tuple[int, float]] = []   # (step, grad_norm), finite ones only
        self.evals: list[tuple[int, float]] = []   # (step, eval loss)
        self.best_eval: tuple[int, float, float | None] | None = None  # step, loss, train mean then
        self.diagnoses: list[Diagnosis] = []
        self.stop_reason: str | None = None
        self._plateau_checked = False

    # -- helpers --------------------------------------------------------------------------------
    def _fire(self, kind: str, step: int, message: str, **evidence) -> list[Diagnosis]:
        if any(d.kind == kind for d in self.diagnoses):
            return []
        d = Diagnosis(kind, int(step), f"step {step}: {message}",
                      {k: (round(v, 6) if isinstance(v, float) else v) for k, v in evidence.items()})
        self.diagnoses.append(d)
        return [d]

    def _train_mean(self) -> float | None:
        recent = [v for _, v in self.train[-TRAIN_WINDOW:]]
        return statistics.fmean(recent) if recent else None

    # -- train logs -----------------------------------------------------------------------------
    def observe_train(self, step: int, loss: float, grad_norm: float | None = None) -> list[Diagnosis]:
        """One logged train loss (and the ``grad_norm`` logged with it, if any)."""
        new: list[Diagnosis] = []
        if not _finite(loss):
            self.stop_reason = NON_FINITE_STATUS
            last = self.train[-1] if self.train else None
            return self._fire("non_finite_loss", step,
                              f"non-finite training loss ({loss}); stopping (the last finite loss "
                              + (f"{last[1]:.4g} was logged at step {last[0]}" if last else
                                 "was never logged") + "); lower --lr, add warm-up or clipping",
                              loss=str(loss), last_finite_step=last[0] if last else None)
        loss = float(loss)
        new += self._check_spike(step, loss)
        self.train.append((int(step), loss))
        new += self._check_plateau(step)
        if _finite(grad_norm):
            self.grads.append((int(step), float(grad_norm)))
            new += self._check_vanishing(step)
            new += self._check_clipping(step)
        return new

    def _check_spike(self, step: int, loss: float) -> list[Diagnosis]:
        window = [v for _, v in self.train[-SPIKE_WINDOW:]]
        if len(window) < SPIKE_MIN_POINTS:
            return []
        mean, std = statistics.fmean(window), statistics.pstdev(window)
        if loss > mean + SPIKE_SIGMAS * std and loss > mean * (1 + SPIKE_MIN_RISE):
            sigmas = (loss - mean) / std if std > 0 else math.inf
            return self._fire("loss_spike", step,
                              f"loss spike: {loss:.4g} against a mean of {mean:.4g} (std {std:.3g}) "
                              f"over the previous {len(window)} logged losses, {sigmas:.1f} standard "
                              "deviations up; the learning rate may be too high (warm-up and "
                              "clipping help)", loss=loss, window_mean=mean, window_std=std,
                              sigmas=sigmas if math.isfinite(sigmas) else None, window=len(window))
        return []

    def _check_plateau(self, step: int) -> list[Diagnosis]:
        if self._plateau_checked:
            return []
        after = [v for s, v in self.train if s > self.warmup_steps]
        if len(after) < PLATEAU_LOGS:
            return []
        self._plateau_checked = True
        first = self.train[0][1]
        half = PLATEAU_LOGS // 2
        early, late = statistics.fmean(after[:half]), statistics.fmean(after[half:PLATEAU_LOGS])
        lo, hi = 1 - PLATEAU_REL_DROP, 1 + PLATEAU_REL_DROP
        if late >= lo * first and late >= lo * early and late <= hi * first:
            return self._fire("plateau", step,
                              f"early plateau at a high loss: the mean of the last {PLATEAU_LOGS - half}"
                              f" logged losses, {late:.4g}, is within {PLATEAU_REL_DROP:.0%} of the "
                              f"first, {first:.4g}, after {len(after)} logged steps past warm-up; "
                              "the learning rate may be too low (or there is no gradient signal)",
                              first_loss=first, early_mean=early, late_mean=late)
        return []

    def _check_vanishing(self, step: int) -> list[Diagnosis]:
        if len(self.grads) < VANISH_LOGS:
            return []
        peak = max(g for _, g in self.grads)
        recent = [g for _, g in self.grads[-VANISH_LOGS:]]
        limit = max(VANISH_ABS, VANISH_RATIO * peak)
        if all(g < limit for g in recent):
            return self._fire("vanishing_gradients", step,
                              f"vanishing gradients: the last {VANISH_LOGS} logged gradient norms are "
                              f"all below {limit:.3g} ({VANISH_RATIO:g} x the largest so far, "
                              f"{peak:.3g}); latest {recent[-1]:.3g}",
                              recent_grad_norms=recent, peak_grad_norm=peak)
        return []

    def _check_clipping(self, step: int) -> list[Diagnosis]:
        if not self.max_grad_norm or len(self.grads) < CLIP_MIN_LOGS:
            return []
        window = [g for _, g in self.grads[-CLIP_WINDOW:]]
        cut = CLIP_CUT_RATIO * self.max_grad_norm
        n_cut = sum(g > cut for g in window)
        if n_cut > CLIP_FRACTION * len(window):
            return self._fire("clipping_most_steps", step,
                              f"clipping dominates: on {n_cut} of the last {len(window)} logged steps "
                              f"the gradient norm exceeds {CLIP_CUT_RATIO:g} x --max-grad-norm "
                              f"{self.max_grad_norm:g} (median {statistics.median(window):.3g}); the "
                              "learning rate or the loss scale may be too high",
                              clipped_steps=n_cut, window=len(window), max_grad_norm=self.max_grad_norm,
                              median_grad_norm=statistics.median(window))
        return []

    # -- eval logs ------------------------------------------------------------------------------
    def observe_eval(self, step: int, eval_loss: float) -> list[Diagnosis]:
        """One logged eval loss."""
        if not _finite(eval_loss):
            return []
        eval_loss = float(eval_loss)
        prev = self.evals[-1][1] if self.evals else None
        self.evals.append((int(step), eval_loss))
        last = [v for _, v in self.evals[-(OVERFIT_RISING_EVALS + 1):]]
        rising = len(last) == OVERFIT_RISING_EVALS + 1 and all(
            a < b for a, b in zip(last, last[1:], strict=False))
        train_now = self._train_mean()
        if self.best_eval is None or eval_loss < self.best_eval[1]:
            self.best_eval = (int(step), eval_loss, train_now)
            return []
        best_step, best, train_then = self.best_eval
        if (rising and eval_loss >= best * (1 + OVERFIT_RISE)
                and train_now is not None and train_then is not None and train_now < train_then):
            return self._fire("overfitting", step,
                              f"overfitting: eval loss {eval_loss:.4g} has risen at {OVERFIT_RISING_EVALS}"
                              f" evaluations in a row ({prev:.4g} at the previous one, lowest "
                              f"{best:.4g} at step {best_step}) while the "
                              f"train loss keeps falling ({train_then:.4g} -> {train_now:.4g}, mean of "
                              f"the last {TRAIN_WINDOW} logged); stop earlier, add data or "
                              "regularisation", eval_loss=eval_loss, previous_eval_loss=prev,
                              best_eval_loss=best, best_eval_step=best_step,
                              train_loss_then=train_then, train_loss_now=train_now)
        return []


def signature_callback(detector: SignatureDetector, announce: bool = True):
    """A ``transformers.TrainerCallback`` feeding ``detector`` from the Trainer's logs.

    Each new diagnosis is printed once (to stderr, when ``announce``). A non-finite loss stops
    training at that step with no evaluation and no checkpoint, so the checkpoints kept on disk
    are from before it.
    """
    from transformers import TrainerCallback

    class SignatureCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            new = []
            if "loss" in logs:
                new += detector.observe_train(state.global_step, logs["loss"], logs.get("grad_norm"))
            if "eval_loss" in logs:
                new += detector.observe_eval(state.global_step, logs["eval_loss"])
            if announce:
                for d in new:
                    print(f"attnkit finetune: diagnosis: {d.message}", file=sys.stderr, flush=True)
            if detector.stop_reason is not None:
                control.should_training_stop = True
                control.should_save = False
                control.should_evaluate = False
            return control

    return SignatureCallback()
