"""Latency measurement: warm-up, interleaved rounds, percentiles, paired ratios.

Every variant runs in the same rounds, in a fixed order (A B C A B C ...), so
a slow-down of the shared machine hits all of them alike. Each round runs a
variant ``calls`` times back to back; the per-round median is the unit the
pairwise ratio against the baseline is computed on, so the speedup reported
is the median of ratios measured seconds apart, not of two runs minutes apart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt.hardware import cpu_model, has_int8_dot, reported_flags
from graphopt.process import heap_policy

__all__ = [
    "TimingConfig",
    "Samples",
    "percentile",
    "summarize",
    "paired_speedup",
    "run_interleaved",
    "rotated_medians",
    "machine_info",
    "finish_report",
    "load_warning",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimingConfig:
    """How long to measure. ``quick`` is for smoke runs and tests."""

    warmup: int = 3
    rounds: int = 15
    round_time_s: float = 0.05  # target time per variant per round (sets calls/round)
    max_calls: int = 20

    @classmethod
    def quick(cls) -> TimingConfig:
        return cls(warmup=1, rounds=4, round_time_s=0.0, max_calls=2)


@dataclass
class Samples:
    """Raw latencies of one variant at one shape: ``rounds[r]`` = seconds per call."""

    rounds: list[list[float]] = field(default_factory=list)

    @property
    def flat(self) -> list[float]:
        return [t for r in self.rounds for t in r]

    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds if r]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100), numpy's default method."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: Samples, batch: int) -> dict[str, float]:
    """p50/p90/p99/mean latency (ms), throughput (samples/s) and spread.

    ``spread`` is the inter-quartile range over the median: 0.05 means the
    middle half of the calls lie within 5 % of the median.
    """
    xs = samples.flat
    if not xs:
        return {}
    p50 = percentile(xs, 50)
    return {
        "p50_ms": p50 * 1e3,
        "p90_ms": percentile(xs, 90) * 1e3,
        "p99_ms": percentile(xs, 99) * 1e3,
        "mean_ms": statistics.fmean(xs) * 1e3,
        "min_ms": min(xs) * 1e3,
        "throughput": batch / p50 if p50 > 0 else math.inf,
        "spread": (percentile(xs, 75) - percentile(xs, 25)) / p50 if p50 > 0 else 0.0,
        "calls": len(xs),
    }


def paired_speedup(baseline: Samples, variant: Samples) -> dict[str, float]:
    """Speedup of ``variant`` over ``baseline`` measured round by round.

    For each round r: ratio_r = median(baseline calls in r) / median(variant
    calls in r). Returns the median ratio and its 10th/90th percentiles (the
    spread of the pairwise ratios); > 1 means the variant is faster.
    """
    ratios = [b / v for b, v in zip(baseline.round_medians(), variant.round_medians()) if v > 0]
    if not ratios:
        return {"speedup": math.nan, "speedup_p10": math.nan, "speedup_p90": math.nan, "pairs": 0}
    return {
        "speedup": statistics.median(ratios),
        "speedup_p10": percentile(ratios, 10),
        "speedup_p90": percentile(ratios, 90),
        "pairs": len(ratios),
    }


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time_call(fn: Callable[[], Any]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def run_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    config: TimingConfig,
    on_round: Callable[[int, int], None] | None = None,
    failures: dict[str, str] | None = None,
) -> dict[str, Samples]:
    """Warm each callable up, then time them in interleaved rounds (each round starts with one
    untimed call per variant: the first call after a switch ran 1.1-2.8x slower on tiny models, and a
    slow variant with one or two calls per round carried it in its round median).

    ``fns`` maps a variant name to a zero-argument callable (inputs bound).
    The number of calls per round is set per variant from its warm-up time so
    a round lasts about ``config.round_time_s`` (at least one call). With a
    ``failures`` dict, a callable that raises is recorded there and dropped
    from the later rounds instead of stopping the run.
    """
    calls: dict[str, int] = {}
    samples = {name: Samples() for name in fns}
    live = dict(fns)
    for name, fn in fns.items():
        try:
            per_call = min(_time_call(fn) for _ in range(max(1, config.warmup)))
        except Exception as e:  # noqa: BLE001
            if failures is None:
                raise
            failures[name] = f"failed in warm-up: {type(e).__name__}: {str(e).strip()[:200]}"
            del live[name]
            continue
        n = 1 if per_call <= 0 else math.ceil(config.round_time_s / per_call)
        calls[name] = max(1, min(config.max_calls, n))
    for r in range(config.rounds):
        for name, fn in list(live.items()):
            try:
                fn()  # untimed: the first call after another variant ran pays for its caches and buffers
                samples[name].rounds.append([_time_call(fn) for _ in range(calls[name])])
            except Exception as e:  # noqa: BLE001 - one variant failing must not stop the others
                if failures is None:
                    raise
                failures[name] = f"failed in timing round {r + 1}: {type(e).__name__}: {str(e).strip()[:200]}"
                del live[name]
        if on_round is not None:
            on_round(r + 1, config.rounds)
    return samples


def rotated_medians(fns: Mapping[str, Callable[[], Any]], rounds: int, calls: int,
                    before: Callable[[str], None] | None = None) -> dict[str, float]:
    """Median per-call seconds of each callable, for A/B benchmarks of a few artifacts: per
    round, in an order rotated every round (none always runs right after another), call
    ``before(name)`` (e.g. set its thread count), make one untimed call (a switch costs the
    first call), then time ``calls`` calls; the median of the round medians."""
    names = list(fns)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if before is not None:
                before(name)
            fns[name]()
            per_round[name].append(statistics.median(_time_call(fns[name]) for _ in range(calls)))
    return {n: statistics.median(v) for n, v in per_round.items()}


def load_warning() -> str | None:
    """A warning when the 1-minute load average exceeds the core count."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load1 > cores:
        return (
            f"machine is loaded (1-min load average {load1:.1f} > {cores} cores): "
            "absolute latencies are inflated; the interleaved ratios are the numbers to trust"
        )
    return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed or no metadata
        return None


def finish_report(report: dict[str, Any], load_start: list[float], json_path: str | None) -> dict[str, Any]:
    """A benchmark script's JSON report completed with the load averages and the machine (CPU
    model and flags go with every figure), printed in one line and written to ``json_path``."""
    info = machine_info()
    report.update(load_average_start=load_start, load_average_end=list(os.getloadavg()), machine=info)
    print(f"load average start {load_start}, end {report['load_average_end']}; cpu {info['cpu']} {info['cpu_flags']}")
    if json_path:
        with open(json_path, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    return report


def machine_info() -> dict[str, Any]:
    """CPU, cores, threads, load, device and library versions for the report."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": reported_flags(),
        "int8_dot": has_int8_dot(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "heap": heap_policy(),
        "versions": {
            name: _version(name)
            for name in ("graphopt", "torch", "onnxruntime", "onnx", "onnxscript", "torchao", "tensorrt", "transformers")
        },
    }
    return info
