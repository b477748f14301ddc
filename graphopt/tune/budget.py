"""The time budget: parse it, predict what a trial will cost, refuse one that would blow it.

A trial is started only when the time spent so far, its predicted cost and
the reserve for the end (the confirmation run and the report) fit in the
budget. Costs are predicted from this run's own trials: the screening time
of earlier pipelines of the same precision family, the compile time
(lower + load + first call) of earlier trials on the same runtime, and the
time of earlier timing runs. A runtime not yet seen is predicted from the
reference trial's eager build times a per-runtime factor
(:data:`COMPILE_FACTOR`, measured on the zoo's tiny and base models here:
ONNX export is ~3x a torch.export save, an AOTInductor compile ~10x).
The first trial always runs, so a run lasts at most the budget plus one
trial's misprediction; the 10% of slack covers that.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import defaultdict

from graphopt.tune.data import DataSpecError
from graphopt.tune.space import Candidate
from graphopt.tune.trials import Trial

__all__ = ["Budget", "parse_budget", "COMPILE_FACTOR", "SLACK"]

#: compile time of a runtime's first trial relative to the eager build of the reference trial
COMPILE_FACTOR = {"eager": 1.0, "torchscript": 1.0, "onnxruntime": 3.0, "inductor": 10.0, "tensorrt": 15.0}
#: max_autotune benchmarks GEMM kernels while compiling
AUTOTUNE_FACTOR = 4.0
#: a run may end this much after the budget (mispredicted last trial, report)
SLACK = 0.10

_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_budget(text: str | float) -> float:
    """``"600"``, ``"90s"``, ``"10m"``, ``"1.5h"`` -> seconds (> 0)."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", text.lower())
        if not m or m.group(2) not in _UNITS:
            raise DataSpecError(f"--budget {text!r}: expected seconds or a duration such as 90s, 10m, 1h")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not (math.isfinite(seconds) and seconds > 0):
        raise DataSpecError(f"--budget {text!r}: must be a positive duration")
    return seconds


class Budget:
    """Wall-clock budget of one tune invocation."""

    def __init__(self, seconds: float, clock: callable = time.monotonic):  # type: ignore[valid-type]
        self.seconds = float(seconds)
        self.clock = clock
        self.start = clock()
        self.reserve = 0.0  # seconds kept for the end (confirmation + report)
        self.started_trials = 0
        self._screen: dict[str, list[float]] = defaultdict(list)
        self._compile: dict[str, list[float]] = defaultdict(list)
        self._timing: list[float] = []
        self._reference_build: float | None = None

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def remaining(self) -> float:
        return self.seconds - self.elapsed

    def observe(self, trial: Trial) -> None:
        """Learn from a finished trial's cost."""
        family = trial.candidate.family
        if trial.screen_s > 0:
            self._screen[family].append(trial.screen_s)
        if trial.compile_s > 0:
            self._compile[_compile_key(trial.candidate)].append(trial.compile_s)
            if self._reference_build is None and trial.candidate.runtime == "eager":
                self._reference_build = trial.compile_s
        if trial.timing_s > 0:
            self._timing.append(trial.timing_s)

    def predict(self, cand: Candidate, screened: bool) -> float:
        """Seconds a trial of ``cand`` is expected to take (its screen may already be cached)."""
        screen = 0.0
        if not screened:
            past = self._screen.get(cand.family) or [x for xs in self._screen.values() for x in xs]
            screen = statistics.median(past) if past else 0.0
        past_compile = self._compile.get(_compile_key(cand))
        if past_compile:
            build = statistics.median(past_compile)
        else:
            base = self._reference_build or 0.0
            build = base * COMPILE_FACTOR.get(cand.runtime, 5.0)
            if dict(cand.lower).get("max_autotune") == "true":
                build *= AUTOTUNE_FACTOR
        timing = statistics.median(self._timing) if self._timing else 0.0
        return screen + build + timing

    def allows(self, predicted: float) -> bool:
        """Whether a trial predicted to take ``predicted`` seconds may start now."""
        if self.started_trials == 0:
            return True
        return self.elapsed + predicted + self.reserve <= self.seconds

    def exhausted(self) -> bool:
        """No time is left for anything but the end (confirmation and report)."""
        return self.started_trials > 0 and self.elapsed + self.reserve >= self.seconds

    @property
    def deadline_passed(self) -> bool:
        return self.elapsed > self.seconds * (1.0 + SLACK)


def _compile_key(cand: Candidate) -> str:
    autotune = dict(cand.lower).get("max_autotune") == "true"
    return cand.runtime + (":autotune" if autotune else "")
