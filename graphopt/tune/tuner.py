"""``tune()``: search pipelines x runtimes x options for the fastest artifact that
keeps the ranking, within a time budget, keeping the best on disk as it improves.

``OUT/`` (a graphopt output folder, ``.graphopt`` marker) holds ``tune.json``
(the settings), ``trials.jsonl`` (one line per finished trial, fsynced),
``sensitivity.json``, ``best/`` (the best artifact so far, replaced
atomically), and at the end ``report.md``, ``pareto.png`` and
``result.json`` (the confirmation run). Work artifacts live in
``OUT/.work/`` while they may still be needed and are removed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.bench.timing import TimingConfig, load_warning, machine_info
from graphopt.errors import ArtifactError, GraphoptError, first_line
from graphopt.outputs import MARKER, atomic_directory, check_output_path, written_by_graphopt
from graphopt.runtime import Artifact, get_runtime, load
from graphopt.runtime.artifact import read_artifact
from graphopt.tune.budget import SLACK, Budget, parse_budget
from graphopt.tune.data import DataSpecError, resolve_model, tune_data
from graphopt.tune.evaluate import OBJECTIVES, Evaluator, objective_value
from graphopt.tune.fidelity import METRICS, Judge, parse_drop
from graphopt.tune.keepbest import BEST_DIR, tune_section, write_best
from graphopt.tune.sensitivity import compute_sensitivity, load_sensitivity, ranking, save_sensitivity
from graphopt.tune.space import Candidate, Space, build_space
from graphopt.tune.strategy import STRATEGIES
from graphopt.tune.trials import TRIALS_FILE, Trial, TrialLog

__all__ = ["tune", "TuneResult", "TuneProgress", "TUNE_FILE", "DEFAULT_RUNTIMES"]

log = logging.getLogger(__name__)

TUNE_FILE = "tune.json"
RESULT_FILE = "result.json"
WORK_DIR = ".work"
#: runtimes searched by default (those available here); stages is a deployment layout, not a speed knob
DEFAULT_RUNTIMES = ("eager", "torchscript", "onnxruntime", "inductor", "tensorrt")
#: settings a resumed run must share with the run it continues
_RESUME_KEYS = ("model", "data", "metric", "max_drop", "objective", "shapes")


@dataclass
class TuneProgress:
    """What the tuner is doing, for a progress bar (the CLI renders it)."""

    message: str
    elapsed_s: float
    budget_s: float
    trials: int
    best: str = ""
    best_speedup: float | None = None


@dataclass
class TuneResult:
    """The outcome: the best artifact (``OUT/best``), its trial and every trial."""

    out_dir: Path
    best: Artifact | None
    best_trial: Trial | None
    trials: list[Trial]
    confirmation: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    sensitivity: dict[str, Any] | None = None

    @property
    def report(self) -> Path:
        return self.out_dir / "report.md"

    def load(self, **options: Any) -> Any:
        """The best artifact's Runner (``graphopt.load(OUT/best)``)."""
        if self.best is None:
            raise ArtifactError(f"{self.out_dir} holds no best artifact yet")
        return load(self.best.path, **options)


# ------------------------------------------------------------------ validation
def _shapes(batch_sizes: Sequence[int], seq_lens: Sequence[int], dynamic: set[str], program: Any) -> list[tuple[int, int | None]]:
    batches = list(dict.fromkeys(int(b) for b in batch_sizes))
    if "batch" not in dynamic and program.inputs and program.inputs[0].shape:
        batches = [int(program.inputs[0].shape[0])]
    seqs: list[int | None] = list(dict.fromkeys(int(s) for s in seq_lens)) if "seq" in dynamic else [None]
    return [(b, s) for b in batches for s in seqs]


def _check_runtimes(runtimes: Sequence[str] | None) -> list[str]:
    from graphopt.bench.variants import runtime_status

    explicit = runtimes is not None
    names = list(runtimes if runtimes is not None else DEFAULT_RUNTIMES)
    status = runtime_status(names)
    out = []
    for name in names:
        ok, why = status[name]
        if not ok:
            if explicit:
                if why.startswith("unknown runtime"):
                    raise DataSpecError(f"--runtimes: {why}")
                log.warning("runtime %s skipped: %s", name, why)
            continue
        out.append(get_runtime(name).name)
    if not out:
        raise DataSpecError("--runtimes: none of them is available here; `graphopt runtimes` says why")
    return out


def _prepare_out(out: Path, settings: dict[str, Any], resume: bool, force: bool) -> list[Trial]:
    """Create OUT (or check it for --resume); return the trials to replay."""
    out = check_output_path(out)
    if out.exists() and resume:
        if not (out / TUNE_FILE).is_file():
            raise ArtifactError(f"{out} has no {TUNE_FILE}: it is not a graphopt tune output; drop --resume or pick another -o")
        before = json.loads((out / TUNE_FILE).read_text())
        for key in _RESUME_KEYS:
            if before.get(key) != settings.get(key):
                raise DataSpecError(
                    f"--resume: {out} was tuned with {key}={before.get(key)!r}, this run asks {settings.get(key)!r}; "
                    "resume with the same settings or start over with --force"
                )
        for stale in out.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return TrialLog(out / TRIALS_FILE).read()
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --resume to continue it or --force to start over")
    with atomic_directory(out, force=force, kind="tune") as tmp:
        (tmp / TUNE_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    return []


# ------------------------------------------------------------------ the run
class _Run:
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

    def ranking(self) -> list[str]:
        return ranking(self.sensitivity())

    def sensitivity(self) -> dict[str, Any]:
        """Loaded from OUT or computed once; {} while the budget cannot pay for it."""
        if self._sensitivity is None:
            fusions = tuple(self.space.fusions)
            base = Candidate(fusions=fusions).pipeline
            found = load_sensitivity(self.out, base, self.settings["metric"])
            if found is None:
                per = sorted(s.seconds for s in self.evaluator.screens.values() if s.seconds)
                predicted = (per[len(per) // 2] if per else 0.0) * (self._count_linears(fusions) + 5)
                if not self.budget.allows(predicted):
                    log.info("sensitivity not computed: predicted %.0fs, %.0fs left", predicted, self.budget.remaining)
                    return {}
                self._say("computing per-layer sensitivity (once)")
                found = compute_sensitivity(self.evaluator, fusions, on_step=self._say)
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
        pipeline = cand.resolved_pipeline(self.ranking() if cand.keep_float else ())
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
        layers = self.ranking() if cand.keep_float else []
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
        self._say(f"trial {n} ({stage}): {key}")
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
        self._say(f"trial {n} {what}")
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
        self._say(f"trial {n} ({stage}): {cand.key}: same program as trial {twin.n}")
        return trial

    # -------------------------------------------------- bookkeeping
    def _adopt(self, trial: Trial) -> None:
        self._trials.append(trial)
        self.by_key[trial.key] = trial

    def artifact_of(self, trial: Trial) -> str:
        """Where the trial's artifact is: its work folder, or OUT/best when that holds it."""
        if trial.artifact and Path(trial.artifact).is_dir():
            return trial.artifact
        if self.best is trial and _best_key(self.out) == trial.key:
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

    def _say(self, message: str) -> None:
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
        self._say(f"confirming {len(finalists)} finalists in one interleaved run")
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


# ------------------------------------------------------------------ tune()
def tune(
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    data: str | None = None,
    calib: str | os.PathLike[str] | None = None,
    eval_data: Callable[..., dict[str, float]] | None = None,
    metric: str | None = None,
    max_drop: str | float | None = None,
    budget: str | float = 600,
    batch_sizes: Sequence[int] = (1, 32),
    seq_lens: Sequence[int] = (64,),
    runtimes: Sequence[str] | None = None,
    objective: str = "p50",
    seed: int = 0,
    strategy: str = "greedy",
    prune_ratios: Sequence[float] = (),
    max_trials: int | None = None,
    resume: bool = False,
    force: bool = False,
    timing: TimingConfig | None = None,
    confirm_timing: TimingConfig | None = None,
    progress: Callable[[TuneProgress], None] | None = None,
) -> TuneResult:
    """Find the fastest artifact of ``model`` whose ranking stays within ``max_drop`` of eager's.

    ``model``: what ``graphopt optimize`` accepts, or a Program / ZooModel.
    ``data="ml-100k"`` measures NDCG@10/HR@10 on MovieLens-100K (default
    metric ``ndcg@10``); without it the metric is ``topk-overlap`` against
    eager on held-out batches. ``eval_data``: a callable ``evaluate(fn) ->
    {"ndcg@10": .., "hr@10": ..}`` instead. ``max_drop``: ``"0.5%"`` or
    0.005 (default: the project's bar, :data:`graphopt.metrics.FIDELITY_BAR`).
    ``budget``: seconds or ``"10m"``; the run ends within 10% of it (or after
    one trial, whichever is longer). ``objective``: ``p50``/``p99`` (latency
    ratio vs eager, geometric mean over shapes) or ``throughput`` (at the
    largest batch). ``strategy``: see :mod:`graphopt.tune.strategy`.
    ``max_trials``: stop after this many new trials (the budget still applies).
    ``resume``: continue ``out_dir`` from its ``trials.jsonl``; ``force``:
    replace an existing graphopt-written ``out_dir`` (never a user's folder).

    Returns a :class:`TuneResult`; ``OUT/best`` is loadable with ``graphopt.load``.
    """
    wall = time.monotonic()
    if objective not in OBJECTIVES:
        raise DataSpecError(f"--objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    if strategy not in STRATEGIES:
        raise DataSpecError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    metric = metric or ("ndcg@10" if data is not None or eval_data is not None else "topk-overlap")
    if metric not in METRICS:
        raise DataSpecError(f"--metric {metric!r}: one of {', '.join(METRICS)}")
    drop = METRICS[metric].default_max_drop if max_drop is None else parse_drop(max_drop)
    seconds = parse_budget(budget)
    if max_trials is not None and max_trials < 1:
        raise DataSpecError(f"--max-trials {max_trials}: must be at least 1")
    if resume and force:
        raise DataSpecError("--resume continues OUT and --force starts it over: pass one of them")
    if not batch_sizes or any(int(b) <= 0 for b in batch_sizes) or not seq_lens or any(int(s) <= 0 for s in seq_lens):
        raise DataSpecError("--batch-sizes and --seq-lens must be positive integers")
    runtime_names = _check_runtimes(runtimes)
    out = check_output_path(out_dir)
    if out.exists() and resume and not (out / TUNE_FILE).is_file():
        raise ArtifactError(f"{out} has no {TUNE_FILE}: it is not a graphopt tune output; drop --resume or pick another -o")
    if out.exists() and not resume:
        if not force:
            raise ArtifactError(f"{out} already exists; pass --resume to continue it or --force to start over")
        if not out.is_dir() or not (written_by_graphopt(out) or not any(out.iterdir())):
            raise ArtifactError(f"{out} exists and was not written by graphopt (no {MARKER} file); "
                                "graphopt will not replace it even with --force; pick another -o")
    budget_clock = Budget(seconds)

    tm = resolve_model(model)
    shapes = _shapes(batch_sizes, seq_lens, tm.program.dynamic_labels(), tm.program)
    eval_batch = max(b for b, _ in shapes)
    td = tune_data(tm, data=data, calib=calib, eval_data=eval_data, batch=eval_batch, seed=seed)
    from graphopt.tune.evaluate import _eager

    judge = Judge(metric, drop, td, _eager(tm.program))
    settings = {
        "format": "graphopt.tune/1",
        "model": str(model) if isinstance(model, (str, os.PathLike)) else tm.name,
        "model_name": tm.name,
        "data": data or ("eval_data" if eval_data is not None else None),
        "calib": str(calib) if calib else None,
        "metric": metric, "max_drop": drop, "bar": judge.describe(), "objective": objective,
        "shapes": [[b, s] for b, s in shapes], "runtimes": runtime_names, "seed": seed, "strategy": strategy,
        "budget_s": seconds, "prune_ratios": list(prune_ratios),
        "reference": {k: v for k, v in judge.reference_eval.items()},
        "data_description": td.description, "data_notice": td.notice,
    }
    recorded = _prepare_out(out, settings, resume, force)
    timing = timing or TimingConfig(warmup=2, rounds=5, round_time_s=0.03, max_calls=8)
    confirm_timing = confirm_timing or TimingConfig(warmup=2, rounds=10, round_time_s=0.05, max_calls=10)
    space = build_space(runtime_names, prune_ratios=prune_ratios)
    evaluator = Evaluator(tm, td, judge, shapes, objective, timing, out / WORK_DIR)
    run = _Run(out, space, seed, evaluator, budget_clock, recorded, progress, settings, timing, confirm_timing)
    run.max_trials = max_trials
    _restore_best(run, recorded)
    run._say(f"tuning {tm.name}: {len(runtime_names)} runtimes, budget {seconds:.0f}s, bar: {judge.describe()}")
    warnings_ = [w] if (w := load_warning()) else []
    interrupted = False
    try:
        STRATEGIES[strategy](run)
        run.update_reserve()
        confirmation = run.confirm()
    except KeyboardInterrupt:  # OUT/best and trials.jsonl are complete; write the report of what ran
        interrupted = True
        confirmation = {"done": False, "why": "interrupted (Ctrl-C); --resume continues"}
    finally:
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    if not warnings_ and (w := load_warning()) is not None:
        warnings_.append(w.replace("machine is loaded", "machine became loaded during the run"))
    best_trial = run.best
    best = read_artifact(out / BEST_DIR, verify=False) if (out / BEST_DIR).is_dir() else None
    result = TuneResult(out, best, best_trial, run.trials(), confirmation, settings,
                        time.monotonic() - wall, run._sensitivity)
    summary = {
        **settings, "machine": machine_info(), "warnings": warnings_, "wall_s": result.wall_s,
        "trials": len(run.trials()), "replayed": run.replayed, "not_started_budget": run.skipped_budget,
        "best": best_trial.to_json() if best_trial else None, "confirmation": confirmation,
        "torch_threads": torch.get_num_threads(),
    }
    _write_json(out / RESULT_FILE, summary)
    from graphopt.tune.report import write_report

    write_report(result, summary)
    run._say(f"done in {result.wall_s:.0f}s: {len(run.trials())} trials, best {best_trial.key if best_trial else '-'}")
    if interrupted:
        raise KeyboardInterrupt
    return result


def _best_key(out: Path) -> str | None:
    try:
        return read_artifact(out / BEST_DIR, verify=False).manifest.get("tune", {}).get("key")
    except GraphoptError:
        return None


def _restore_best(run: _Run, recorded: list[Trial]) -> None:
    """After --resume: the trial OUT/best holds is the best so far (else the log's fastest)."""
    ok = [t for t in recorded if t.ok]
    if not ok:
        return
    held = _best_key(run.out)
    match = [t for t in ok if t.key == held]
    run.best = match[-1] if match else max(ok, key=lambda t: (t.objective, -t.n))
    if not match:
        log.warning("%s holds %s, the log's best is %s (its artifact is gone); the next better trial replaces it",
                    run.out / BEST_DIR, held, run.best.key)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str, allow_nan=True) + "\n")
    os.replace(tmp, path)
