"""The search context the strategies drive: run or replay a trial, keep the best, confirm.

:class:`SearchRun` implements :class:`graphopt.tune.strategy.SearchContext` for a
real run: it answers a candidate from the resumed log or an earlier trial of
the same program (a twin), refuses one the budget cannot pay for, runs the
rest through the :class:`~graphopt.tune.evaluate.Evaluator`, appends each
finished trial to ``trials.jsonl``, replaces ``OUT/best`` when a trial beats
the best so far, keeps the artifacts the final confirmation needs, and at the
end re-times the finalists together and promotes the fastest.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graphopt.bench.timing import TimingConfig
from graphopt.errors import GraphoptError, first_line
from graphopt.runtime import load
from graphopt.runtime.artifact import read_artifact
from graphopt.tune.budget import SLACK, Budget
from graphopt.tune.evaluate import Evaluator, objective_value
from graphopt.tune.keepbest import BEST_DIR, tune_section, write_best
from graphopt.tune.sensitivity import compute_sensitivity, load_sensitivity, ranking, save_sensitivity
from graphopt.tune.space import Candidate, Space
from graphopt.tune.trials import TRIALS_FILE, Trial, TrialLog

__all__ = ["SearchRun", "TuneProgress", "best_key"]

log = logging.getLogger(__name__)


@dataclass
class TuneProgress:
    """What the tuner is doing, for a progress bar (the CLI renders it)."""

    message: str
    elapsed_s: float
    budget_s: float
    trials: int
    best: str = ""
    best_speedup: float | None = None


class SearchRun:
    """The search context the strategies drive (see graphopt.tune.strategy.SearchContext)."""

    def __init__(self, out: Path, space: Space, seed: int, evaluator: Evaluator, budget: Budget,
                 recorded: list[Trial], progress: Callable[[TuneProgress], None] | None, settings: dict[str, Any],
                 timing: TimingConfig, confirm_timing: TimingConfig):
        self.out, self.space, self.seed = out, space, seed
        self.timing, self.confirm_timing = timing, confirm_timing
        self.evaluator, self.budget = evaluator, budget
        self.log = TrialLog(out / TRIALS_FILE)
        self.recorded = {t.key: t for t in recorded}
        self.next_n = max((t.n for t in recorded), default=0) + 1
        self._trials: list[Trial] = []
        self.by_key: dict[str, Trial] = {}
        self.best: Trial | None = None
        self.skipped_budget = 0
        self.progress = progress
        self.settings = settings
        self._sensitivity: dict[str, Any] | None = None
        self.replayed = 0
        self.new_trials = 0
        self.max_trials: int | None = None

    # -------------------------------------------------- SearchContext
    def trials(self) -> list[Trial]:
        return list(self._trials)

    def exhausted(self) -> bool:
        return self.budget.exhausted() or (self.max_trials is not None and self.new_trials >= self.max_trials)

    @property
    def computed_sensitivity(self) -> dict[str, Any] | None:
        """The sensitivity tables if this run computed or loaded them."""
        return self._sensitivity or None

    def ranking(self, family: str = "int8") -> list[str]:
        return ranking(self.sensitivity(), family)

    def sensitivity(self) -> dict[str, Any]:
        """Loaded from OUT or computed once; {} while the budget cannot pay for it."""
        if self._sensitivity is None:
            fusions = tuple(self.space.fusions)
            base = Candidate(fusions=fusions).pipeline
            found = load_sensitivity(self.out, base, self.settings["metric"])
            if found is None:
                per = sorted(s.seconds for s in self.evaluator.screens.values() if s.seconds)
                predicted = (per[len(per) // 2] if per else 0.0) * (2 * self._count_linears(fusions) + 5)
                if not self.budget.allows(predicted):
                    log.info("sensitivity not computed: predicted %.0fs, %.0fs left", predicted, self.budget.remaining)
                    return {}
                self.say("computing per-layer sensitivity (once)")
                found = compute_sensitivity(self.evaluator, fusions, on_step=self.say)
                save_sensitivity(self.out, found)
            self._sensitivity = found
        return self._sensitivity

    def _count_linears(self, fusions: tuple[str, ...]) -> int:
        from graphopt.passlib.qdq import find_linears

        base = Candidate(fusions=fusions)
        try:
            return len(find_linears(self.evaluator.program_for(base, base.pipeline).gm)[0])
        except Exception:  # noqa: BLE001 - the estimate only
            return 8

    def screen(self, cand: Candidate) -> dict[str, Any] | None:
        pipeline = cand.resolved_pipeline(self.ranking(cand.family) if cand.keep_float else ())
        ev = self.evaluator
        if pipeline not in ev.screens and not self.budget.allows(self.budget.predict(cand, False) * 0.3):
            return None
        s = ev.screen(cand, pipeline)
        result = {"meets": s.meets, "fidelity": s.fidelity, "eager_ms": math.inf}
        if s.meets:
            fn = ev.program_for(cand, pipeline)
            inputs = list(ev.inputs.values())[-1]
            with torch.inference_mode():
                fn.gm(*inputs)
                start = time.perf_counter()
                fn.gm(*inputs)
            result["eager_ms"] = 1e3 * (time.perf_counter() - start)
        return result

    def evaluate(self, cand: Candidate, stage: str) -> Trial | None:
        key = cand.key
        if key in self.by_key:
            return self.by_key[key]
        if key in self.recorded:
            trial = self.recorded.pop(key)
            self.replayed += 1
            self._adopt(trial)
            return trial
        layers = self.ranking(cand.family) if cand.keep_float else []
        if cand.keep_float and not layers:
            return None  # no sensitivity ranking (the budget could not pay for it)
        if self.max_trials is not None and self.new_trials >= self.max_trials:
            return None
        pipeline = cand.resolved_pipeline(layers)
        screen = self.evaluator.screens.get(pipeline)
        if screen is not None and (twin := self._twin(cand, screen.fingerprint)) is not None:
            return self._record_twin(cand, stage, pipeline, twin)
        predicted = 0.0 if screen is not None and not screen.meets else self.budget.predict(cand, screen is not None)
        if not self.budget.allows(predicted):
            self.skipped_budget += 1
            log.info("not started (predicted %.0fs, %.0fs left): %s", predicted, self.budget.remaining, key)
            return None
        self.budget.started_trials += 1
        self.new_trials += 1
        n = self.next_n
        self.next_n += 1
        self.say(f"trial {n} ({stage}): {key}")
        fresh = pipeline not in self.evaluator.screens
        if fresh:  # screen first: an identical program needs no build
            self.evaluator.screen(cand, pipeline)
            twin = self._twin(cand, self.evaluator.screens[pipeline].fingerprint)
            if twin is not None:
                self.next_n -= 1
                self.budget.started_trials -= 1
                self.new_trials -= 1
                return self._record_twin(cand, stage, pipeline, twin, screen_s=self.evaluator.screens[pipeline].seconds)
        trial = self.evaluator.run(cand, pipeline, n, stage)
        if fresh:
            trial.screen_s = self.evaluator.screens[pipeline].seconds
            trial.wall_s += trial.screen_s
        self.budget.observe(trial)
        if trial.ok and (self.best is None or trial.objective > self.best.objective):
            self._promote(trial)
        self.log.append(trial)
        self._adopt(trial)
        self._release_artifacts()
        self.update_reserve()
        what = f"{trial.status}" + (f" {trial.objective:.2f}x" if trial.ok else f": {trial.reason}")
        self.say(f"trial {n} {what}")
        return trial

    def _twin(self, cand: Candidate, fp: str) -> Trial | None:
        """An earlier trial of the same program (fingerprint), runtime and options."""
        if not fp:
            return None
        options = (cand.runtime, cand.lower, cand.load, cand.threads)
        for t in self._trials:
            c = t.candidate
            if t.fingerprint == fp and (c.runtime, c.lower, c.load, c.threads) == options:
                return t
        return None

    def _record_twin(self, cand: Candidate, stage: str, pipeline: str, twin: Trial, screen_s: float = 0.0) -> Trial:
        """A finished trial that reuses ``twin``'s results: its pipeline left the same program."""
        n = self.next_n
        self.next_n += 1
        trial = Trial(n=n, candidate=cand, stage=stage, status=twin.status, pipeline=pipeline,
                      reason=f"same program as trial {twin.n}" + (f": {twin.reason}" if twin.reason else ""),
                      fidelity=twin.fidelity, runtime_fidelity=twin.runtime_fidelity, latency=twin.latency,
                      objective=twin.objective, screen_s=screen_s, fingerprint=twin.fingerprint,
                      started=time.time(), twin_of=twin.n)
        self.log.append(trial)
        self._adopt(trial)
        self.budget.observe(trial)
        self.new_trials += 1
        self.say(f"trial {n} ({stage}): {cand.key}: same program as trial {twin.n}")
        return trial

    # -------------------------------------------------- bookkeeping
    def _adopt(self, trial: Trial) -> None:
        self._trials.append(trial)
        self.by_key[trial.key] = trial

    def artifact_of(self, trial: Trial) -> str:
        """Where the trial's artifact is: its work folder, or OUT/best when that holds it."""
        if trial.artifact and Path(trial.artifact).is_dir():
            return trial.artifact
        if self.best is trial and best_key(self.out) == trial.key:
            return str(self.out / BEST_DIR)
        return ""

    def _promote(self, trial: Trial, latency: dict[str, Any] | None = None) -> None:
        section = tune_section(trial, metric=self.settings["metric"], bar=self.settings["bar"],
                               objective=self.settings["objective"])
        if latency is not None:
            section["latency"] = latency
            section["speedup"] = objective_value(latency, self.settings["objective"])
            section["confirmed"] = True
        write_best(self.out, Path(trial.artifact), section)
        trial.best = True
        self.best = trial
        log.info("new best: %s (%.2fx)", trial.key, trial.objective or math.nan)

    def keep_set(self) -> list[Trial]:
        """Trials whose artifacts the confirmation needs: best, best per runtime, best default."""
        keep: list[Trial] = []
        pool = self._trials + ([self.best] if self.best is not None and self.best not in self._trials else [])
        ok = [t for t in pool if t.ok and self.artifact_of(t)]
        if not ok:
            return keep
        ranked = sorted(ok, key=lambda t: (-t.objective, t.n))
        keep.append(ranked[0])
        for rt in self.space.runtimes:
            top = next((t for t in ranked if t.candidate.runtime == rt), None)
            if top is not None and top not in keep:
                keep.append(top)
        default = next((t for t in ranked if "default" in t.candidate.tags or t.stage == "defaults"), None)
        if default is not None and default not in keep:
            keep.append(default)
        return keep[:6]

    def _release_artifacts(self) -> None:
        keep = {t.artifact for t in self.keep_set()}
        work = self.evaluator.work_dir
        for t in self._trials:
            if t.artifact and t.artifact not in keep and Path(t.artifact).parent == work:
                shutil.rmtree(t.artifact, ignore_errors=True)
                t.artifact = ""

    def say(self, message: str) -> None:
        log.info("%s", message)
        if self.progress is not None:
            best = self.best
            self.progress(TuneProgress(message, self.budget.elapsed, self.budget.seconds, len(self._trials),
                                       best.key if best else "", best.objective if best else None))

    # -------------------------------------------------- the end
    def _confirm_cost(self, finalists: list[Trial], rounds: int) -> float:
        """Seconds a confirmation of ``finalists`` over ``rounds`` rounds should take, from their latencies."""
        cfg = self.confirm_timing
        per_round = 0.0
        for key in (finalists[0].latency if finalists else {}):
            p50s = [t.latency.get(key, {}).get("p50_ms", 0.0) / 1e3 for t in finalists]
            p50s.append(finalists[0].latency[key].get("eager_p50_ms", 0.0) / 1e3)
            for p in p50s:
                calls = max(1, min(cfg.max_calls, math.ceil(cfg.round_time_s / p))) if p > 0 else 1
                per_round += calls * p
        loads = sum(0.3 * t.compile_s for t in finalists)
        return (rounds + max(1, cfg.warmup)) * per_round + loads

    def update_reserve(self) -> None:
        """Keep time for the confirmation run and the report."""
        self.budget.reserve = 2.0 + self._confirm_cost(self.keep_set(), self.confirm_timing.rounds)

    def confirm(self) -> dict[str, Any]:
        """Re-time the finalists interleaved in one run; promote the fastest."""
        finalists = self.keep_set()
        if len(finalists) < 2:
            return {"done": False, "why": "fewer than two finalists with artifacts"}
        available = self.budget.seconds * (1 + SLACK) - self.budget.elapsed - 2.0
        rounds = self.confirm_timing.rounds
        while rounds >= 3 and self._confirm_cost(finalists, rounds) > available:
            rounds -= 1
        if rounds < 3:
            return {"done": False, "why": f"no time left in the budget ({available:.0f}s)"}
        c = self.confirm_timing
        timing = TimingConfig(c.warmup, rounds, c.round_time_s, c.max_calls)
        self.say(f"confirming {len(finalists)} finalists in one interleaved run")
        runners, fns = [], {}
        try:
            for t in finalists:
                runner = load(self.artifact_of(t), **self.evaluator.load_options(t.candidate))
                runner.activate()
                runners.append(runner)
                fns[str(t.n)] = runner
            latency = self.evaluator.time(fns, timing)
        except Exception as e:  # noqa: BLE001 - the search result stands without the confirmation
            return {"done": False, "why": f"confirmation failed: {first_line(e)}"}
        finally:
            for r in runners:
                try:
                    r.close()
                except Exception:  # noqa: BLE001
                    pass
        rows = []
        for t in finalists:
            lat = latency[str(t.n)]
            rows.append({"n": t.n, "key": t.key, "stage": t.stage, "default": t.stage == "defaults",
                         "runtime": t.candidate.runtime, "latency": lat,
                         "objective": objective_value(lat, self.settings["objective"]), "search_objective": t.objective})
        winner_row = max(rows, key=lambda r: (r["objective"] or -1.0, -r["n"]))
        winner = next(t for t in finalists if t.n == winner_row["n"])
        winner.artifact = self.artifact_of(winner)
        self._promote(winner, winner_row["latency"])
        return {"done": True, "rounds": timing.rounds, "finalists": rows, "winner": winner.n}


def best_key(out: Path) -> str | None:
    """The candidate key OUT/best holds (its manifest's tune section), if any."""
    try:
        return read_artifact(out / BEST_DIR, verify=False).manifest.get("tune", {}).get("key")
    except GraphoptError:
        return None
