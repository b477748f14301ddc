"""Benchmark harness: every (pipeline, runtime) variant and the peer recipes
against eager fp32, in one run, on the same inputs.

    import graphopt
    report = graphopt.bench("bert4rec:base", ["O2"], ["eager", "onnxruntime"], peers=True, out_dir="bench/")
    print(report.render_markdown())

Modules: ``timing`` (interleaved rounds, percentiles, paired ratios),
``variants`` (optimize + lower + load), ``peers`` (torch.compile, ONNX Runtime
transformer recipe, torchao/torch.ao int8), ``accuracy`` (numeric and ranking
drift, HR/NDCG), ``memory`` (peak RSS alone in a subprocess), ``report`` and
``plots`` (report.json, report.md, PNGs), ``harness`` (``bench``).
"""

import sys
import types
from typing import Any

from graphopt.bench.accuracy import ClickEvalData, EvalData, make_evaluator
from graphopt.bench.harness import bench
from graphopt.bench.peers import PEERS
from graphopt.bench.pipelines import DEFAULT_PIPELINES
from graphopt.bench.report import BENCH_FORMAT, BenchReport, pareto_front
from graphopt.bench.timing import Samples, TimingConfig, paired_speedup, summarize
from graphopt.bench.variants import DEFAULT_RUNTIMES
from graphopt.metrics import ndcg_vs_reference, ranking_drift

__all__ = [
    "bench",
    "BenchReport",
    "BENCH_FORMAT",
    "EvalData",
    "ClickEvalData",
    "make_evaluator",
    "TimingConfig",
    "Samples",
    "PEERS",
    "DEFAULT_PIPELINES",
    "DEFAULT_RUNTIMES",
    "ranking_drift",
    "ndcg_vs_reference",
    "paired_speedup",
    "summarize",
    "pareto_front",
]


class _CallableModule(types.ModuleType):
    """``graphopt.bench`` is this package *and* the function: ``graphopt.bench(...)``
    calls :func:`graphopt.bench.harness.bench`, while ``import graphopt.bench``
    and ``graphopt.bench.BenchReport`` keep working (a plain re-export of the
    function would shadow the package)."""

    def __call__(self, *args: Any, **kwargs: Any) -> BenchReport:
        return bench(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
