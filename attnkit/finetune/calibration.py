"""Calibration of next-token probabilities on the held-out split, and temperature scaling.

For every held-out token (positions ``1..T-1`` of each sequence, predicted from the ones before),
the model's top-1 probability is its *confidence* and the token being the argmax is *correct*.

* **ECE** (expected calibration error): the tokens are put into :data:`N_BINS` equal-width
  confidence bins on ``[0, 1]``; ``ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|``.
* **NLL**: mean cross-entropy of the true next token (nats), as the eval loss.
* **Temperature**: the ``T`` in ``[1/TEMPERATURE_MAX, TEMPERATURE_MAX]`` minimising the NLL of
  ``softmax(logits / T)``: the NLL is convex in ``1/T``, so a safeguarded Newton iteration on
  ``1/T`` (:func:`fit_temperature`) finds the global minimum in the bracket. It is fitted on
  half of a token subsample and reported (``nll_scaled``, ``ece_scaled``, with the unscaled
  ``nll_report``/``ece_report`` on the same tokens to compare against) on the other half.

Streaming: :class:`CalibrationAccumulator` takes one batch of logits at a time. The ECE bins and
the NLL are exact sums over all tokens; the only logits kept are those of a uniform random
subsample for the temperature fit, at most :data:`FIT_MAX_TOKENS` tokens and
:data:`FIT_MAX_ELEMENTS` logits (64 MiB of fp32), chosen by keeping the tokens with the smallest
random keys (a reservoir), so the memory is bounded whatever the vocabulary and eval size. With a
vocabulary of 128k the fit sees 128 tokens; the temperature is one number, and its error shows in
the report half's ``nll_scaled``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CalibrationAccumulator", "calibrate_model", "fit_temperature", "expected_calibration_error",
           "plot_reliability", "N_BINS", "FIT_MAX_TOKENS", "FIT_MAX_ELEMENTS", "TEMPERATURE_MAX"]

N_BINS = 15
FIT_MAX_TOKENS = 20_000
FIT_MAX_ELEMENTS = 2**24
TEMPERATURE_MAX = 20.0
#: Tokens per chunk in the reductions, so a batch never needs a second logits-sized buffer.
_CHUNK_ELEMENTS = 2**22


class _Bins:
    """Sums per confidence bin: token count, summed confidence, summed correctness; plus NLL."""

    def __init__(self, n_bins: int):
        self.count = torch.zeros(n_bins, dtype=torch.float64)
        self.conf = torch.zeros(n_bins, dtype=torch.float64)
        self.correct = torch.zeros(n_bins, dtype=torch.float64)
        self.nll = 0.0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> None:
        """``logits`` ``[N, V]``, ``targets`` ``[N]`` (int64, negative = not a token: skipped);
        any device."""
        n_bins = self.count.numel()
        step = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
        for i in range(0, logits.shape[0], step):
            y = targets[i:i + step]
            valid = y >= 0
            z = logits[i:i + step][valid].float() / temperature  # the chunk's copy, valid rows only
            y = y[valid]
            lse = torch.logsumexp(z, dim=-1)
            top, pred = z.max(dim=-1)
            conf = torch.exp(top - lse)
            correct = (pred == y).double()
            idx = (conf * n_bins).long().clamp_(0, n_bins - 1)
            self.count += torch.bincount(idx, minlength=n_bins).double().cpu()
            self.conf += torch.bincount(idx, weights=conf.double(), minlength=n_bins).cpu()
            self.correct += torch.bincount(idx, weights=correct, minlength=n_bins).cpu()
            self.nll += float((lse - z.gather(-1, y[:, None]).squeeze(-1)).double().sum())

    @property
    def tokens(self) -> int:
        return int(self.count.sum())

    def ece(self) -> float:
        n = self.count.sum()
        if n == 0:
            return float("nan")
        gap = (self.correct - self.conf).abs()  # |n_b acc_b - n_b conf_b| = n_b |acc_b - conf_b|
        return float(gap.sum() / n)

    def to_json(self) -> dict:
        c = self.count.clamp(min=1)
        return {"count": [int(v) for v in self.count],
                "confidence": [round(float(v), 5) for v in self.conf / c],
                "accuracy": [round(float(v), 5) for v in self.correct / c]}


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = N_BINS,
                               temperature: float = 1.0) -> float:
    """ECE of ``softmax(logits / temperature)`` (``[N, V]``) against ``targets`` (``[N]``)."""
    bins = _Bins(n_bins)
    bins.add(logits, targets, temperature)
    return bins.ece()


def _nll_slope(logits: torch.Tensor, targets: torch.Tensor, beta: float) -> tuple[float, float]:
    """First and second derivatives in ``beta = 1/T`` of the mean NLL of ``softmax(beta z)``:
    ``E_p[z] - z_y`` and ``Var_p[z]`` averaged over the tokens (``logits`` ``[N, V]``; fp32 per
    token, the variance taken about the mean so it does not cancel, sums in fp64)."""
    d1 = d2 = 0.0
    step = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    for i in range(0, logits.shape[0], step):
        z = logits[i:i + step].float()
        p = torch.softmax(beta * z, dim=-1)
        mean = (p * z).sum(-1, keepdim=True)
        zy = z.gather(-1, targets[i:i + step, None]).squeeze(-1)
        d1 += float((mean.squeeze(-1) - zy).double().sum())
        d2 += float((p * (z - mean).square()).sum(-1).double().sum())
    n = max(1, logits.shape[0])
    return d1 / n, d2 / n


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, tol: float = 1e-5,
                    max_iter: int = 60) -> float:
    """The ``T`` in ``[1/TEMPERATURE_MAX, TEMPERATURE_MAX]`` minimising the mean NLL of
    ``softmax(logits / T)``; ``logits`` ``[N, V]``, ``targets`` ``[N]`` (all real tokens).

    The NLL is convex in ``beta = 1/T`` (its second derivative is a variance), so Newton's method
    on ``beta``, kept inside a bracket that the sign of the slope narrows (bisecting in
    ``log beta`` when a step would leave it), finds the minimum in a few passes over the logits.
    A step towards an end of the range first checks the slope there: if the NLL still falls at
    the end (a model whose best temperature is beyond the range), that end is the answer."""
    lo, hi = 1 / TEMPERATURE_MAX, TEMPERATURE_MAX
    ends = {lo, hi}  # range ends whose slope has not been looked at yet
    beta = 1.0
    for _ in range(max_iter):
        d1, d2 = _nll_slope(logits, targets, beta)
        if d1 > 0:  # the NLL rises with beta here: the minimum is at a smaller beta
            hi = beta
        else:
            lo = beta
        new = beta - d1 / d2 if d2 > 1e-12 else math.nan
        if not lo < new < hi:
            end = lo if not new > lo else hi
            if end in ends:
                ends.discard(end)
                slope_end = _nll_slope(logits, targets, end)[0]
                past_end = slope_end >= 0 if end < 1 else slope_end <= 0
                if past_end:  # the minimum is at (or beyond) this end of the range
                    return 1 / end
            new = math.sqrt(lo * hi)  # bisect (in log beta) inside the bracket
        if abs(new - beta) <= tol * beta or hi - lo <= tol * beta:
            beta = new
            break
        beta = new
    return 1 / beta


class CalibrationAccumulator:
    """Streams ``(logits, targets)`` batches; :meth:`result` gives the calibration record.

    ``max_tokens``/``max_elements`` bound the subsample of logits kept for the temperature fit;
    ``seed`` makes that subsample (and so the fit) reproducible.
    """

    def __init__(self, n_bins: int = N_BINS, max_tokens: int = FIT_MAX_TOKENS,
                 max_elements: int = FIT_MAX_ELEMENTS, seed: int = 0):
        self.bins = _Bins(n_bins)
        self.n_bins = n_bins
        self.max_tokens, self.max_elements = max_tokens, max_elements
        self.gen = torch.Generator().manual_seed(seed)
        # the reservoir: ``n`` filled slots of preallocated buffers, so adding a token copies
        # only that token's logits (never the whole subsample)
        self.n = 0
        self.keys = torch.empty(0)                                # [cap] random keys
        self.kept_logits: torch.Tensor | None = None              # [cap, V] fp32, CPU
        self.kept_targets = torch.empty(0, dtype=torch.long)      # [cap]

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits`` ``[..., V]`` and ``targets`` ``[...]`` for the same (already shifted)
        positions; a negative target marks a position that is not a token (skipped), so a
        ``[B, T, V]`` batch can be passed whole, as a view, with its last column of targets -1."""
        logits = logits.reshape(-1, logits.shape[-1])
        targets = targets.reshape(-1).to(logits.device)
        self.bins.add(logits, targets)
        if self.kept_logits is None:
            cap = min(self.max_tokens, max(2, self.max_elements // logits.shape[-1]))
            self.keys = torch.empty(cap)
            self.kept_logits = torch.empty(cap, logits.shape[-1])
            self.kept_targets = torch.empty(cap, dtype=torch.long)
        cap = self.keys.numel()
        keys = torch.rand(targets.numel(), generator=self.gen)
        keys[(targets < 0).cpu()] = math.inf  # not tokens: never kept
        if self.n == cap:  # only tokens that can enter the reservoir are looked at
            keys_new = (keys < self.keys.max()).nonzero().squeeze(-1)
        else:
            keys_new = keys.isfinite().nonzero().squeeze(-1)
        if keys_new.numel() == 0:
            return
        cand = torch.cat([self.keys[:self.n], keys[keys_new]])  # old keys, then the new ones
        kept = torch.zeros(cand.numel(), dtype=torch.bool)
        kept[cand.argsort()[:cap]] = True
        # free slots: dropped old tokens, then the unfilled tail; as many as new tokens kept
        free = torch.cat([(~kept[:self.n]).nonzero().squeeze(-1), torch.arange(self.n, cap)])
        new_kept = keys_new[kept[self.n:]]
        slots = free[:new_kept.numel()]
        self.kept_logits[slots] = logits[new_kept.to(logits.device)].float().cpu()
        self.kept_targets[slots] = targets[new_kept.to(targets.device)].cpu()
        self.keys[slots] = keys[new_kept]
        self.n = min(cap, self.n + new_kept.numel())

    def result(self) -> dict:
        """``tokens``, ``ece``, ``nll``, ``accuracy``, ``confidence`` over every token; the fit:
        ``temperature`` (fitted on ``fit_tokens``), and on the other ``report_tokens``
        ``ece_report``/``nll_report`` (unscaled) and ``ece_scaled``/``nll_scaled``; ``bins`` and
        ``bins_scaled`` (the reliability diagram's data)."""
        b = self.bins
        n = max(1, b.tokens)
        rec = {"tokens": b.tokens, "ece": b.ece(), "nll": b.nll / n,
               "accuracy": float(b.correct.sum()) / n, "confidence": float(b.conf.sum()) / n}
        if self.n >= 2:
            order = self.keys[:self.n].argsort()  # keys are random: alternate ranks are a random halving
            fit, rep = order[0::2], order[1::2]
            t = fit_temperature(self.kept_logits[fit], self.kept_targets[fit])
            before, after = _Bins(self.n_bins), _Bins(self.n_bins)
            before.add(self.kept_logits[rep], self.kept_targets[rep])
            after.add(self.kept_logits[rep], self.kept_targets[rep], t)
            m = max(1, after.tokens)
            # at the bracket's edge the NLL keeps falling past it (e.g. a random model: T -> inf)
            at_bound = abs(abs(math.log(t)) - math.log(TEMPERATURE_MAX)) < 1e-3
            rec.update(temperature=t, temperature_at_bound=at_bound, fit_tokens=int(fit.numel()),
                       report_tokens=int(rep.numel()),
                       ece_report=before.ece(), nll_report=before.nll / m, ece_scaled=after.ece(),
                       nll_scaled=after.nll / m, bins_scaled=after.to_json())
        rec["bins"] = b.to_json()
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()}


@torch.no_grad()
def calibrate_model(model, dataset, batch_size: int, autocast_dtype: torch.dtype | None = None,
                    seed: int = 0) -> dict:
    """Calibration of ``model`` on ``dataset`` (items ``{"input_ids": [T]}``), one batch of
    ``batch_size`` sequences at a time: each position predicts the next token. The model is put
    in eval mode for this and back in its previous mode after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    acc = CalibrationAccumulator(seed=seed)
    try:
        for i in range(0, len(dataset), batch_size):
            ids = torch.stack([dataset[j]["input_ids"] for j in range(i, min(i + batch_size, len(dataset)))])
            ids = ids.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=ids).logits  # [b, T, V]
            # position t predicts token t+1; the last position predicts nothing (target -1), so
            # the logits pass whole, as a view ([:, :-1] would copy them)
            targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)
            acc.update(logits, targets)
    finally:
        model.train(was_training)
    return acc.result()


def plot_reliability(path, stages: dict[str, dict], title: str = "") -> str | None:
    """The reliability diagram: accuracy against confidence per bin for each stage (and the
    last stage after temperature scaling), over a histogram of the token confidences. Returns
    ``None`` on success, else why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); reliability.png skipped"
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 6.4), dpi=100, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    edges = torch.linspace(0, 1, N_BINS + 1)
    centers = ((edges[:-1] + edges[1:]) / 2).tolist()
    curves = [(f"{name} (ECE {rec['ece']:.3f})", rec["bins"]) for name, rec in stages.items()]
    last_name, last = list(stages.items())[-1]
    if "bins_scaled" in last:
        curves.append((f"{last_name}, T = {last['temperature']:.2f} (ECE {last['ece_scaled']:.3f}, "
                       "other half)", last["bins_scaled"]))
    for label, bins in curves:
        pts = [(c, a) for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"], strict=True)
               if n > 0]
        ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=label)
    width = 1 / N_BINS
    for i, (name, rec) in enumerate(stages.items()):
        n = rec["bins"]["count"]
        total = max(1, sum(n))
        hist.bar([c + (i - (len(stages) - 1) / 2) * width / len(stages) for c in centers],
                 [v / total for v in n], width=width / len(stages), label=name)
    ax.set_ylabel("accuracy (top-1 = next token)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=8)
    hist.set_xlabel(f"confidence (top-1 probability), {N_BINS} bins")
    hist.set_ylabel("share of tokens")
    hist.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
