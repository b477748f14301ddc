"""Calibration: observers that pick a clipping range per activation, backend-neutral.

Observers see every value a tensor takes over the calibration batches and
return the range ``(lo, hi)`` to quantize it over:

- ``minmax``: the observed min and max;
- ``percentile``: clip |x| at the given percentile of its histogram;
- ``entropy``: the threshold on |x| minimizing KL(P || Q) between the clipped
  distribution and its 128-level quantization (TensorRT's calibrator), over a
  histogram of at least 2048 bins (ONNX Runtime's default of 128 bins makes
  it coincide with minmax);
- ``mse``: the threshold on |x| minimizing the expected squared error of
  8-bit rounding plus clipping.

One histogram serves every method (:func:`read_as`), so a caller that wants
to compare methods (``quantize-int8{calibration=auto}``) observes once.

Histogram methods threshold |x| and return ``(max(min, -t), min(max, t))``.
Histograms are grown by re-binning when a later batch exceeds the range.
:func:`observe` runs a GraphModule over the batches and feeds chosen nodes'
outputs to observers; :func:`agreement` scores quantized outputs against float
ones (top-k overlap, cosine, NDCG) for the accuracy guard.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from graphopt.metrics import AGREEMENT_METRICS as METRICS
from graphopt.metrics import agreement

__all__ = [
    "METHODS",
    "METRICS",
    "Observer",
    "MinMaxObserver",
    "HistogramObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "make_observer",
    "read_as",
    "observe",
    "agreement",
    "default_calibration",
    "DEFAULT_CALIBRATION_BATCHES",
    "DEFAULT_CALIBRATION_BATCH",
    "CALIBRATION_SEED",
    "ZERO_RANGE",
    "constant_notes",
]

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
#: what graphopt calibrates on when the caller gives no data (CLI, bench, tuner): batches x rows. The int8
#: guard holds out the last quarter: 4 x 32 = 128 rows, where 64 decided layers by one top-10 slot in 640
#: (measured 2026-12-04, bert-cls:base int8-mixed-bf16: 8 batches kept 6 of 19 linears fp32, 16 kept 2,
#: both at the bar on 256 fresh rows: 0.9973 / 0.9953)
DEFAULT_CALIBRATION_BATCHES = 16
DEFAULT_CALIBRATION_BATCH = 32
#: the first seed of calibration batches graphopt draws (i-th batch: this + i), apart from the example
#: inputs' seed 0 and the bench's timed and fidelity batches
CALIBRATION_SEED = 1000
#: the range an all-zero activation is quantized over: scale 1.0 (uint8 [0, 255], zero point 128), as ONNX
#: Runtime's compute_scale_zp gives a zero range, so both quantize it alike. The observed zeros stay exact; the
#: range [0, 0] gave scale 1e-8, where any non-zero input saturated at +-1.3e-6 (error 0.65 on randn inputs)
ZERO_RANGE = (-127.5, 127.5)


def constant_notes(observers: dict[str, Observer]) -> list[str]:
    """One report note naming the activations that were constant on every calibration batch (empty if none)."""
    same = {name: o.min for name, o in sorted(observers.items()) if o.constant}
    if not same:
        return []
    shown = ", ".join(f"{name} (always {v:g})" for name, v in list(same.items())[:5]) + (", ..." if len(same) > 5 else "")
    return [f"calibration: {len(same)} activation(s) were constant on every calibration batch, so their int8 range is a "
            f"guess (zero: scale 1.0, as ONNX Runtime): {shown}; give calibration data that varies them"]


class Observer:
    """Sees tensors with :meth:`update`; :meth:`range` gives ``(lo, hi)``."""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        x = x.float()
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.count += x.numel()

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            raise ValueError("observer saw no values; give calibration batches that reach this layer")
        if self.min == self.max == 0.0:
            return ZERO_RANGE
        return self.min, self.max

    @property
    def constant(self) -> bool:
        """Every value seen was the same (a range that says nothing about unseen inputs)."""
        return self.count > 0 and self.min == self.max


class MinMaxObserver(Observer):
    """The observed minimum and maximum."""


class HistogramObserver(Observer):
    """Histogram of |x| over [0, amax] in ``bins`` bins; subclasses pick a threshold."""

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.float64)
        self.top = 0.0  # upper edge of the histogram

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        if x.numel() == 0:
            return
        a = x.detach().float().abs().flatten()
        amax = float(a.max())
        if amax > self.top:
            self._regrow(amax)
        if self.top == 0.0:
            self.hist[0] += a.numel()
            return
        h = torch.histc(a, bins=self.bins, min=0.0, max=self.top)
        self.hist += h.double().numpy()

    def _regrow(self, top: float) -> None:
        if self.top > 0.0 and self.hist.any():
            width = self.top / self.bins
            centers = (np.arange(self.bins) + 0.5) * width
            idx = np.minimum((centers / (top / self.bins)).astype(np.int64), self.bins - 1)
            self.hist = np.bincount(idx, weights=self.hist, minlength=self.bins).astype(np.float64)
        self.top = top

    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.top, self.bins + 1)

    def threshold(self) -> float:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        lo, hi = super().range()
        if self.top == 0.0:
            return lo, hi
        t = self.threshold()
        return max(lo, -t), min(hi, t)


class PercentileObserver(HistogramObserver):
    """Clip |x| at ``percentile`` (e.g. 99.99) of its distribution."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        self.percentile = percentile

    def threshold(self) -> float:
        cdf = np.cumsum(self.hist) / self.hist.sum()
        i = int(np.searchsorted(cdf, self.percentile / 100.0))
        return float(self.edges()[min(i + 1, self.bins)])


class EntropyObserver(HistogramObserver):
    """TensorRT's KL-divergence threshold: the clip point whose 128-level
    quantization loses least information about the clipped distribution."""

    def __init__(self, bins: int = 2048, levels: int = 128) -> None:
        if bins < 2048:
            raise ValueError(f"entropy calibration needs >= 2048 bins (got {bins}); fewer equal minmax")
        super().__init__(bins)
        self.levels = levels

    def threshold(self) -> float:
        hist, levels = self.hist, self.levels
        stride = max(1, self.bins // 512)
        best_i, best_kl = self.bins, math.inf
        for i in range(levels, self.bins + 1, stride):
            kl = _kl(hist, i, levels)
            if kl < best_kl:
                best_i, best_kl = i, kl
        return float(self.edges()[best_i])


def _kl(hist: np.ndarray, i: int, levels: int) -> float:
    sliced = hist[:i]
    p = sliced.copy()
    p[-1] += hist[i:].sum()
    nonzero = sliced > 0
    group = (np.arange(i) * levels) // i
    sums = np.bincount(group, weights=sliced, minlength=levels)
    counts = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, sums[group] / np.maximum(counts[group], 1.0), 0.0)
    if p.sum() == 0 or q.sum() == 0:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    eps = 1e-4
    q = np.where((p > 0) & (q == 0), eps, q)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class MSEObserver(HistogramObserver):
    """The |x| threshold minimizing rounding error (step t/127) plus clipping error."""

    def threshold(self) -> float:
        edges = self.edges()
        centers = (edges[:-1] + edges[1:]) / 2
        stride = max(1, self.bins // 512)
        best_t, best_err = float(edges[-1]), math.inf
        for i in range(stride, self.bins + 1, stride):
            t = float(edges[i])
            step = t / 127.0
            inside = centers <= t
            err = np.sum(self.hist[inside]) * step * step / 12.0
            err += np.sum(self.hist[~inside] * (centers[~inside] - t) ** 2)
            if err < best_err:
                best_t, best_err = t, err
        return best_t


def make_observer(method: str, *, percentile: float = 99.99, bins: int = 2048) -> Observer:
    if method == "minmax":
        return MinMaxObserver()
    if method == "percentile":
        return PercentileObserver(percentile, bins)
    if method == "entropy":
        return EntropyObserver(max(bins, 2048))
    if method == "mse":
        return MSEObserver(bins)
    raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(METHODS)}")


def read_as(observer: HistogramObserver, method: str, *, percentile: float = 99.99) -> Observer:
    """The same observations read with ``method``: a histogram observer's counts (and
    min/max) shared by a new observer, so one calibration run serves every method."""
    other = MinMaxObserver() if method == "minmax" else make_observer(method, percentile=percentile,
                                                                      bins=observer.bins)
    if isinstance(other, HistogramObserver):
        if other.bins != observer.bins:
            raise ValueError(f"{method} needs >= {other.bins} bins; observe with at least that many")
        other.hist, other.top = observer.hist, observer.top
    other.min, other.max, other.count = observer.min, observer.max, observer.count
    return other


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, observers: dict[str, Observer]) -> None:
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        obs = self.observers.get(n.name)
        if obs is not None and isinstance(result, torch.Tensor):
            obs.update(result)
        return result


def _progress(total: int, label: str) -> Any:
    """A rich progress bar on an interactive stderr, else None."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    task = bar.add_task(label, total=total)
    return bar, task


def observe(
    gm: torch.fx.GraphModule,
    batches: Sequence[Sequence[torch.Tensor]],
    node_names: Iterable[str],
    method: str = "minmax",
    *,
    percentile: float = 99.99,
    bins: int = 2048,
) -> dict[str, Observer]:
    """Run ``gm`` on every batch; return an observer per named node, fed its outputs
    (``method="histogram"``: a plain histogram of ``bins`` bins, for :func:`read_as`)."""
    if method == "histogram":
        observers: dict[str, Observer] = {name: HistogramObserver(bins) for name in node_names}
    else:
        observers = {name: make_observer(method, percentile=percentile, bins=bins) for name in node_names}
    recorder = _Recorder(gm, observers)
    progress = _progress(len(batches), f"calibrating ({method})")
    try:
        with torch.no_grad():
            for batch in batches:
                recorder.run(*batch)
                if progress is not None:
                    progress[0].advance(progress[1])
    finally:
        if progress is not None:
            progress[0].stop()
    log.debug("calibrated %d tensors over %d batches (%s)", len(observers), len(batches), method)
    return observers


def default_calibration(
    program: Any, n: int = DEFAULT_CALIBRATION_BATCHES, batch: int | None = DEFAULT_CALIBRATION_BATCH
) -> list[tuple[torch.Tensor, ...]]:
    """Seeded random batches (seeds 1000+, apart from the example inputs' 0 and the
    bench's checks) from the Program's input specs, ``batch`` rows each where the
    batch dim is dynamic (None: the captured batch). The int8 guard holds out the
    last quarter, so 16 x 32 gives it 128 held-out rows to score the ranking on."""
    return [program.sample_inputs(batch=batch, seed=CALIBRATION_SEED + i) for i in range(n)]
