"""One trial: screen a candidate's fidelity cheaply, then build, check and time it.

1. **Screen** (cached per pipeline, shared by every runtime): optimize the
   Program (calibrating int8 on the calibration batches; pruning then
   ``graphopt.pruning.recover``), run it in eager on the held-out data and
   judge it against the bar. Below the bar: the trial ends here, no compile.
2. **Build**: lower to the runtime with the candidate's options into a work
   folder, load it (``spin=False``, the thread option), first call.
3. **Check**: the runtime's own outputs against the bar (a runtime may round
   differently from eager; eager artifacts reuse the screen).
4. **Time**: interleaved rounds against eager fp32 (the original module when
   known, as ``graphopt bench``'s baseline; else the captured Program) at every shape
   (:func:`graphopt.bench.timing.run_interleaved`), paired ratios.

Failures at any step end the trial with a one-line reason; the search goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import shutil
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.bench.timing import TimingConfig, paired_speedup, run_interleaved, summarize
from graphopt.errors import GraphoptError, first_line
from graphopt.ir.program import Program
from graphopt.runtime import get_runtime, load, lower
from graphopt.transform.optimize import optimize
from graphopt.transform.pipeline import parse_pipeline
from graphopt.tune.data import TuneData, TuneModel
from graphopt.tune.fidelity import Judge
from graphopt.tune.space import Candidate, thread_option
from graphopt.tune.trials import BELOW_BAR, FAILED, OK, Trial

__all__ = ["Evaluator", "Screen", "OBJECTIVES", "objective_value", "shape_key", "fingerprint"]

log = logging.getLogger(__name__)

#: what "faster" means: p50 / p99 latency ratio vs eager (geometric mean over shapes),
#: or throughput at the largest batch
OBJECTIVES = ("p50", "p99", "throughput")
#: distillation steps after pruning
RECOVER_STEPS = 50


def shape_key(batch: int, seq: int | None) -> str:
    return f"b{batch}" + (f"s{seq}" if seq else "")


def objective_value(latency: dict[str, dict[str, float]], objective: str) -> float | None:
    """The trial's score from its per-shape latencies (higher is better, 1.0 = eager)."""
    if not latency:
        return None
    if objective == "throughput":
        largest = max(latency.values(), key=lambda r: (r.get("batch", 0), r.get("seq") or 0))
        return largest.get("speedup")
    key = "speedup" if objective == "p50" else "speedup_p99"
    values = [r.get(key) for r in latency.values()]
    if not values or any(v is None or not math.isfinite(v) or v <= 0 for v in values):
        return None
    return float(math.exp(statistics.fmean(math.log(v) for v in values)))


@dataclass
class Screen:
    """A pipeline's screening result (shared by every runtime)."""

    pipeline: str
    fidelity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    reason: str = ""  # the pipeline failed
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""  # same graph and weights as another pipeline -> same artifact

    @property
    def meets(self) -> bool:
        return not self.reason and bool(self.fidelity.get("meets"))


class Evaluator:
    """Screens, builds, checks and times candidates of one model."""

    def __init__(self, tm: TuneModel, data: TuneData, judge: Judge, shapes: Sequence[tuple[int, int | None]],
                 objective: str, timing: TimingConfig, work_dir: Path, *, cache_programs: int = 3,
                 threads: int | None = None):
        self.threads = threads
        self.tm, self.data, self.judge = tm, data, judge
        self.shapes = list(shapes)
        self.objective = objective
        self.timing = timing
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.baseline = tm.reference()
        maker = data.inputs or tm.make_inputs
        self.inputs = {shape_key(b, s): maker(b, s, 7) for b, s in self.shapes}
        self.screens: dict[str, Screen] = {}
        self._programs: OrderedDict[str, Program] = OrderedDict()
        self._cache_programs = cache_programs

    # ------------------------------------------------------------ screen
    def screen(self, cand: Candidate, pipeline: str) -> Screen:
        """Optimize with ``pipeline`` and judge it in eager (cached by pipeline text)."""
        if pipeline in self.screens:
            return self.screens[pipeline]
        start = time.perf_counter()
        result = Screen(pipeline)
        try:
            program = self._optimize(cand, pipeline, result.notes)
            self._remember(pipeline, program)
            result.fingerprint = fingerprint(program)
            if pipeline:
                result.fidelity = self.judge.screen(_eager(program))
            else:
                result.fidelity = self._exact()
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a pass that raises is a failed candidate
            result.reason = first_line(e)
        result.seconds = time.perf_counter() - start
        self.screens[pipeline] = result
        return result

    def _exact(self) -> dict[str, Any]:
        j = self.judge
        if j.metric.source == "eval":
            ref = j.reference_eval
            return {"metric": j.metric.key, "value": ref[j.metric.key], "reference": ref[j.metric.key],
                    "change_pct": 0.0, "values": dict(ref), "reference_values": dict(ref), "meets": True, "why": ""}
        return {"metric": "topk_overlap", "value": 1.0, "reference": 1.0, "change_pct": 0.0,
                "values": {"topk_overlap": 1.0}, "meets": True, "why": ""}

    def _remember(self, pipeline: str, program: Program) -> None:
        self._programs[pipeline] = program
        self._programs.move_to_end(pipeline)
        while len(self._programs) > self._cache_programs:
            self._programs.popitem(last=False)  # re-optimized if a later trial needs it

    def _optimize(self, cand: Candidate, pipeline: str, notes: list[str]) -> Program:
        program = self.tm.program
        if not pipeline:
            return program
        steps = parse_pipeline(pipeline)
        needs = any("calibration_data" in p.requires for p in steps)
        calib = self.data.calibration if needs else None
        if cand.prune:
            from graphopt.passlib.pruning import recover

            n_prune = len(parse_pipeline(cand.prune))
            pruned, _ = optimize(program, list(steps)[:n_prune])
            stats = recover(pruned, program, self.data.calibration, steps=RECOVER_STEPS)
            notes.append(f"recovered by distillation: loss {stats['loss_before']:.4g} -> {stats['loss_after']:.4g}")
            rest = list(steps)[n_prune:]
            out, _ = optimize(pruned, rest, calibration_data=calib) if rest else (pruned, None)
            return out
        out, _ = optimize(program, steps, calibration_data=calib)
        return out

    def program_for(self, cand: Candidate, pipeline: str) -> Program:
        """The optimized Program (re-optimized when it fell out of the small cache)."""
        if pipeline in self._programs:
            self._programs.move_to_end(pipeline)
            return self._programs[pipeline]
        program = self._optimize(cand, pipeline, [])
        self._remember(pipeline, program)
        return program

    # ------------------------------------------------------------ a trial
    def run(self, cand: Candidate, pipeline: str, n: int, stage: str) -> Trial:
        """Screen, then (if it meets the bar) build, check and time: one finished trial."""
        started = time.time()
        t0 = time.perf_counter()
        trial = Trial(n=n, candidate=cand, stage=stage, status=FAILED, pipeline=pipeline, started=started)
        cached = pipeline in self.screens
        screen = self.screen(cand, pipeline)
        trial.screen_s = 0.0 if cached else screen.seconds
        trial.fidelity = screen.fidelity
        trial.fingerprint = screen.fingerprint
        if screen.reason:
            trial.reason = f"pipeline: {screen.reason}"
        elif not screen.meets:
            trial.status, trial.reason = BELOW_BAR, f"eager: {screen.fidelity.get('why', 'below the bar')}"
        else:
            try:
                program = self.program_for(cand, pipeline)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                trial.reason = f"pipeline: {first_line(e)}"
            else:
                self._build_check_time(trial, program)
        trial.wall_s = time.perf_counter() - t0
        return trial

    def _build_check_time(self, trial: Trial, program: Program) -> None:
        cand = trial.candidate
        out = self.work_dir / f"t{trial.n:04d}"
        shutil.rmtree(out, ignore_errors=True)
        runner = None
        try:
            start = time.perf_counter()
            lower(program, cand.runtime, out, force=True, **dict(cand.lower))
            runner = load(out, **self.load_options(cand))
            fn = _runner_fn(runner)
            first = next(iter(self.inputs.values()))
            fn(*first)
            trial.compile_s = time.perf_counter() - start
            trial.artifact = str(out)
            start = time.perf_counter()
            if cand.runtime != "eager":
                trial.runtime_fidelity = self.judge.measure(fn)
                if not trial.runtime_fidelity.get("meets"):
                    trial.status = BELOW_BAR
                    trial.reason = f"{cand.runtime}: {trial.runtime_fidelity.get('why', 'below the bar')}"
                    return
            else:
                trial.runtime_fidelity = dict(trial.fidelity)
            trial.latency = self.time({"candidate": fn})["candidate"]
            trial.objective = objective_value(trial.latency, self.objective)
            trial.status = OK if trial.objective is not None else FAILED
            if trial.objective is None:
                trial.reason = "timing failed"
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - lowering/loading/running failures end the trial
            trial.status, trial.reason = FAILED, first_line(e)
        finally:
            trial.timing_s = time.perf_counter() - start if trial.compile_s else 0.0
            if runner is not None:
                with contextlib.suppress(Exception):
                    runner.close()
            if trial.status != OK:
                shutil.rmtree(out, ignore_errors=True)
                trial.artifact = ""

    def load_options(self, cand: Candidate) -> dict[str, Any]:
        declared = {o.name for o in get_runtime(cand.runtime).runner_options}
        options: dict[str, Any] = {"spin": False} if "spin" in declared else {}
        options.update(dict(cand.load))
        name = thread_option(cand.runtime)
        if (cand.threads or self.threads) and name:
            options[name] = cand.threads or self.threads
        return options

    # ------------------------------------------------------------ timing
    def time(self, fns: dict[str, Callable[..., Any]], timing: TimingConfig | None = None,
             on_round: Callable[[int, int], None] | None = None) -> dict[str, dict[str, dict[str, float]]]:
        """Time ``fns`` interleaved with eager at every shape: name -> shape -> latency + speedups."""
        config = timing or self.timing
        results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in fns}
        for (batch, seq), (key, inputs) in zip(self.shapes, self.inputs.items()):
            bound = {"eager": lambda xs=inputs: self.baseline(*xs)}
            bound.update({name: (lambda f=f, xs=inputs: f(*xs)) for name, f in fns.items()})
            failures: dict[str, str] = {}
            samples = run_interleaved(bound, config, on_round=on_round, failures=failures)
            if "eager" in failures:
                raise GraphoptError(f"eager baseline failed while timing: {failures['eager']}")
            base = samples["eager"]
            base_p99 = summarize(base, batch).get("p99_ms", math.nan)
            for name in fns:
                if name in failures:
                    raise GraphoptError(failures[name])
                lat = summarize(samples[name], batch)
                sp = paired_speedup(base, samples[name])
                results[name][key] = {
                    "batch": batch, "seq": seq, "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
                    "throughput": lat["throughput"], "speedup": sp["speedup"],
                    "speedup_p10": sp["speedup_p10"], "speedup_p90": sp["speedup_p90"],
                    "speedup_p99": base_p99 / lat["p99_ms"] if lat["p99_ms"] > 0 else math.nan,
                    "eager_p50_ms": summarize(base, batch)["p50_ms"],
                }
        return results


def fingerprint(program: Program) -> str:
    """Hash of the graph code and a summary of every tensor it reads: two pipelines that
    leave the same graph and weights (a fusion that did not fire) build the same artifact."""
    h = hashlib.sha256(program.gm.code.encode())
    for name, t in sorted(program.parameter_tensors().items()):
        stats = (t.double().sum().item(), t.double().abs().sum().item()) if t.numel() and not t.is_complex() else ()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{stats}".encode())
    h.update(str([(s.name, s.dtype) for s in program.inputs]).encode())
    return h.hexdigest()[:16]


def _eager(program: Program) -> Callable[..., tuple[torch.Tensor, ...]]:
    gm = program.gm

    def call(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            out = gm(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return call


def _runner_fn(runner: Any) -> Callable[..., tuple[torch.Tensor, ...]]:
    runner.activate()
    on_device = str(runner.device) != "cpu"

    def call(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = runner(*inputs)
        if on_device:
            runner.synchronize()
        return out

    return call
