"""``graphopt tune``: the fastest deployable artifact under a ranking budget and a time budget.

    import graphopt
    result = graphopt.tune("bert4rec:base", "tuned/", metric="topk-overlap", budget="10m")
    runner = result.load()                  # graphopt.load("tuned/best")
    print(result.best_trial.key, result.best_trial.objective)

Modules: ``space`` (candidates and the knobs, read from the pass and runtime
registries), ``data`` (the model and its calibration/screening/evaluation
data), ``fidelity`` (metrics and the bar), ``evaluate`` (screen, build,
check, time one candidate), ``sensitivity`` (per-layer, once), ``budget``,
``strategy`` (greedy, random, halving), ``search`` (the context strategies
drive: replay, twins, keep-best, confirmation), ``trials`` (``trials.jsonl``),
``keepbest`` (``OUT/best``), ``report`` (report.md, pareto.png), ``replay``
(strategies against a table of measured trials), ``tuner`` (``tune``).
"""

import sys
import types
from typing import Any

from graphopt.tune.fidelity import METRICS, Metric
from graphopt.tune.space import Candidate, Space, build_space
from graphopt.tune.strategy import STRATEGIES
from graphopt.tune.trials import Trial, TrialLog
from graphopt.tune.tuner import TuneProgress, TuneResult, tune

__all__ = [
    "tune",
    "TuneResult",
    "TuneProgress",
    "Trial",
    "TrialLog",
    "Candidate",
    "Space",
    "build_space",
    "STRATEGIES",
    "METRICS",
    "Metric",
]


class _CallableModule(types.ModuleType):
    """``graphopt.tune`` is this package *and* the function, like ``graphopt.bench``:
    ``graphopt.tune(...)`` calls :func:`graphopt.tune.tuner.tune`."""

    def __call__(self, *args: Any, **kwargs: Any) -> TuneResult:
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
