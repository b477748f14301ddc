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
An autotuning compile (``max_autotune`` given as true, or left unset where
the runtime turns it on for this model: Inductor on a base-size CPU model)
is predicted :data:`AUTOTUNE_FACTOR` times a plain one until one is seen.
The first trial always runs, so a run lasts at most the budget plus one
trial's misprediction; the 10% of slack covers that.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

from graphopt.errors import LoweringError
from graphopt.ir.program import Program
from graphopt.options import resolve_options
from graphopt.runtime import get_runtime
from graphopt.tune.data import DataSpecError
from graphopt.tune.space import Candidate
from graphopt.tune.trials import Trial

__all__ = ["Budget", "parse_budget", "autotunes_for", "COMPILE_FACTOR", "SLACK"]

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
        #: whether a candidate's compile autotunes (set by the tuner for its model: :func:`autotunes_for`)
        self.autotunes: Callable[[Candidate], bool] = _explicit_autotune

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
            self._compile[self._compile_key(trial.candidate)].append(trial.compile_s)
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
        past_compile = self._compile.get(self._compile_key(cand))
        if past_compile:
            build = statistics.median(past_compile)
        else:
            base = self._reference_build or 0.0
            build = base * COMPILE_FACTOR.get(cand.runtime, 5.0)
            if self.autotunes(cand):
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

    def _compile_key(self, cand: Candidate) -> str:
        return cand.runtime + (":autotune" if self.autotunes(cand) else "")


def _explicit_autotune(cand: Candidate) -> bool:
    return dict(cand.lower).get("max_autotune") == "true"


def autotunes_for(program: Program) -> Callable[[Candidate], bool]:
    """Whether a candidate's lowering of ``program`` autotunes: its ``max_autotune`` option
    as the runtime resolves it for ``program`` (given, or its per-Program default). Decided
    on the model as given, before the candidate's passes (an int8 pipeline the runtime will
    not autotune is predicted as autotuned: a budget errs long)."""
    cache: dict[tuple, bool] = {}

    def autotunes(cand: Candidate) -> bool:
        key = (cand.runtime, cand.lower)
        if key not in cache:
            cache[key] = _explicit_autotune(cand)
            try:
                backend = get_runtime(cand.runtime)
                if any(o.name == "max_autotune" for o in backend.lower_options):
                    opts = resolve_options(backend.lower_options, dict(cand.lower), "tune", LoweringError)
                    cache[key] = bool(backend.complete_options(program, opts).get("max_autotune"))
            except Exception:  # noqa: BLE001 - a prediction: the candidate's own lowering reports its error
                pass
        return cache[key]

    return autotunes
