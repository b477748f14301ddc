"""Replay a strategy against a table of measured trials, on a simulated clock.

How the strategies were compared (``benchmarks/tune_strategies.py``): each
candidate is measured for real once (screen, compile, check, time) and its
result and costs stored in a :class:`Table`; every strategy then runs against
that table with a simulated clock that charges each trial its measured cost
(a pipeline's screen only the first time in a run), under the same
:class:`~graphopt.tune.budget.Budget` rules as a real run. Strategies thus
differ only in which candidates they try and when, not in timing noise.
Candidates missing from the table are measured through ``measure`` (a real
:class:`~graphopt.tune.evaluate.Evaluator`) or, without one, count as failed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.tune.budget import Budget
from graphopt.tune.space import Candidate, Space
from graphopt.tune.strategy import STRATEGIES
from graphopt.tune.trials import FAILED, Trial

__all__ = ["Table", "ReplayContext", "replay"]


@dataclass
class Table:
    """Measured trials by candidate key, screens by pipeline, and the sensitivity ranking."""

    trials: dict[str, dict[str, Any]] = field(default_factory=dict)
    screens: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranking: list[str] = field(default_factory=list)
    ranking_s: float = 0.0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"trials": self.trials, "screens": self.screens, "ranking": self.ranking,
                                          "ranking_s": self.ranking_s}, indent=1, allow_nan=True))

    @classmethod
    def load(cls, path: str | Path) -> Table:
        p = Path(path)
        if not p.is_file():
            return cls()
        d = json.loads(p.read_text())
        return cls(d.get("trials", {}), d.get("screens", {}), d.get("ranking", []), d.get("ranking_s", 0.0))


class ReplayContext:
    """A :class:`~graphopt.tune.strategy.SearchContext` over a :class:`Table`."""

    def __init__(self, table: Table, space: Space, seed: int, budget_s: float,
                 measure: Callable[[Candidate, str], dict[str, Any]] | None = None,
                 measure_screen: Callable[[Candidate, str], dict[str, Any]] | None = None,
                 pipeline_of: Callable[[Candidate], str] | None = None):
        self.table, self.space, self.seed = table, space, seed
        self.now = 0.0
        self.budget = Budget(budget_s, clock=lambda: self.now)
        self.measure, self.measure_screen = measure, measure_screen
        self.pipeline_of = pipeline_of or (lambda c: c.resolved_pipeline(self.table.ranking))
        self._trials: list[Trial] = []
        self._by_key: dict[str, Trial] = {}
        self._screened: set[str] = set()
        self._ranked = False
        self.trajectory: list[tuple[float, float]] = []  # (simulated seconds, best objective so far)

    def trials(self) -> list[Trial]:
        return list(self._trials)

    def exhausted(self) -> bool:
        return self.budget.exhausted()

    def ranking(self, family: str = "int8") -> list[str]:
        """The table's one recorded ranking, for every family (a replay does not re-measure)."""
        if not self._ranked:
            self._ranked = True
            self.now += self.table.ranking_s
        return self.table.ranking

    def _record(self, cand: Candidate) -> dict[str, Any]:
        key = cand.key
        if key not in self.table.trials:
            self.table.trials[key] = self.measure(cand, self.pipeline_of(cand)) if self.measure else \
                {"status": FAILED, "reason": "not in the table", "objective": None}
        return self.table.trials[key]

    def screen(self, cand: Candidate) -> dict[str, Any] | None:
        pipeline = self.pipeline_of(cand)
        if pipeline not in self.table.screens:
            if self.measure_screen is None:
                return None
            self.table.screens[pipeline] = self.measure_screen(cand, pipeline)
        s = self.table.screens[pipeline]
        if pipeline not in self._screened:
            if not self.budget.allows(s.get("seconds", 0.0)):
                return None
            self._screened.add(pipeline)
            self.now += s.get("seconds", 0.0)
        return s

    def _twin(self, cand: Candidate, fp: str) -> Trial | None:
        if not fp:
            return None
        return next((t for t in self._trials if t.fingerprint == fp and _same_build(t.candidate, cand)), None)

    def evaluate(self, cand: Candidate, stage: str) -> Trial | None:
        if cand.key in self._by_key:
            return self._by_key[cand.key]
        pipeline = self.pipeline_of(cand)
        screened = pipeline in self._screened
        rec = self._record(cand)
        if not screened and pipeline in self.table.screens:
            rec.setdefault("screen_s", self.table.screens[pipeline].get("seconds", 0.0))
        twin = self._twin(cand, rec.get("fingerprint", ""))
        predicted = self.budget.predict(cand, screened) if twin is None else 0.0
        if not self.budget.allows(predicted):
            return None
        self.budget.started_trials += 1
        build = 0.0 if twin is not None else rec.get("compile_s", 0.0) + rec.get("timing_s", 0.0)
        cost = (0.0 if screened else rec.get("screen_s", 0.0)) + build
        self._screened.add(pipeline)
        self.now += cost
        trial = Trial(n=len(self._trials) + 1, candidate=cand, stage=stage, status=rec["status"], pipeline=pipeline,
                      reason=rec.get("reason", ""), fidelity=rec.get("fidelity", {}), objective=rec.get("objective"),
                      screen_s=0.0 if screened else rec.get("screen_s", 0.0), compile_s=rec.get("compile_s", 0.0),
                      timing_s=rec.get("timing_s", 0.0), fingerprint=rec.get("fingerprint", ""),
                      twin_of=twin.n if twin is not None else None)
        if twin is not None:  # the same program was built and timed already in this run (as graphopt tune does)
            trial.status, trial.objective, trial.compile_s, trial.timing_s = twin.status, twin.objective, 0.0, 0.0
        self.budget.observe(trial)
        self._trials.append(trial)
        self._by_key[cand.key] = trial
        best = max((t.objective for t in self._trials if t.ok), default=math.nan)
        self.trajectory.append((self.now, best))
        return trial


def _same_build(a: Candidate, b: Candidate) -> bool:
    return (a.runtime, a.lower, a.load, a.threads) == (b.runtime, b.lower, b.load, b.threads)


def replay(strategy: str, table: Table, space: Space, seed: int, budget_s: float, **kwargs: Any) -> ReplayContext:
    """Run ``strategy`` against ``table``; the context holds the trials and the trajectory."""
    ctx = ReplayContext(table, space, seed, budget_s, **kwargs)
    STRATEGIES[strategy](ctx)
    return ctx
