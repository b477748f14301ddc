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

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.bench.timing import TimingConfig, load_warning, machine_info
from graphopt.errors import ArtifactError, Terminated
from graphopt.outputs import check_output_path
from graphopt.process import keep_freed_memory
from graphopt.runtime import Artifact, get_runtime, load
from graphopt.runtime.artifact import read_artifact, sha256_file
from graphopt.tune.budget import Budget, autotunes_for, parse_budget
from graphopt.tune.data import DataSpecError, resolve_model, tune_data
from graphopt.tune.evaluate import OBJECTIVES, Evaluator
from graphopt.tune.fidelity import METRICS, Judge, parse_drop
from graphopt.tune.keepbest import BEST_DIR
from graphopt.tune.outdir import RESULT_FILE, TUNE_FILE, WORK_DIR, check_force, check_not_model, prepare_out
from graphopt.tune.search import SearchRun, TuneProgress, best_key
from graphopt.tune.space import build_space
from graphopt.tune.strategy import STRATEGIES
from graphopt.tune.trials import TRIALS_FILE, Trial

__all__ = ["tune", "TuneResult", "TuneProgress", "TUNE_FILE", "DEFAULT_RUNTIMES"]

log = logging.getLogger(__name__)

#: runtimes searched by default (those available here); stages is a deployment layout, not a speed knob
DEFAULT_RUNTIMES = ("eager", "torchscript", "onnxruntime", "inductor", "tensorrt")
#: a deployment layout (graphopt serve-stages), not a speed knob: refused in --runtimes
_NOT_SEARCHED = {"stages": "stages is a deployment layout (`graphopt serve-stages`), not a speed knob; "
                           "tune the runtimes its stages run on (eager, onnxruntime, ...)"}


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
    from graphopt.runtime.contract import dim_ranges, size_outside

    outside = size_outside(dim_ranges(program), program.name,
                           (("--batch-sizes", "batch", batch_sizes), ("--seq-lens", "seq", seq_lens)))
    if outside:  # every trial would fail at that shape
        raise DataSpecError(outside)
    batches = list(dict.fromkeys(int(b) for b in batch_sizes))
    if "batch" not in dynamic and program.inputs and program.inputs[0].shape:
        batches = [int(program.inputs[0].shape[0])]
    seqs: list[int | None] = list(dict.fromkeys(int(s) for s in seq_lens)) if "seq" in dynamic else [None]
    return [(b, s) for b in batches for s in seqs]


def _check_runtimes(runtimes: Sequence[str] | None) -> list[str]:
    from graphopt.bench.variants import runtime_status

    explicit = runtimes is not None
    if isinstance(runtimes, str):  # the Python API's runtimes="eager" or "eager,onnxruntime"
        runtimes = [r.strip() for r in runtimes.split(",") if r.strip()]
    names = list(dict.fromkeys(runtimes if runtimes is not None else DEFAULT_RUNTIMES))
    if explicit and not names:
        raise DataSpecError("--runtimes: name at least one runtime (`graphopt runtimes` lists them)")
    for name in names:
        if explicit and name in _NOT_SEARCHED:
            raise DataSpecError(f"--runtimes {name}: {_NOT_SEARCHED[name]}")
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
        if get_runtime(name).name not in out:  # an alias of one already named
            out.append(get_runtime(name).name)
    if not out:
        raise DataSpecError("--runtimes: none of them is available here; `graphopt runtimes` says why")
    return out


def _prepare_out(out: Path, settings: dict[str, Any], resume: bool, force: bool) -> list[Trial]:
    """Create OUT (or check it for --resume); return the trials to replay (:func:`graphopt.tune.outdir.prepare_out`)."""
    return prepare_out(out, settings, resume, force)


def _sizes(values: int | str | Sequence[int], what: str) -> list[int]:
    """Batch sizes or sequence lengths: one int, "1,32", or a sequence of positive ints."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    elif not isinstance(values, (list, tuple, range)):
        values = [values]  # type: ignore[list-item]
    try:
        out = [int(v) for v in values]
        exact = all(float(v) == int(v) for v in values)
    except (TypeError, ValueError):
        out, exact = [], False
    if not out or not exact or any(v <= 0 for v in out):
        raise DataSpecError(f"--{what} {values!r}: expected positive integers, such as 1,32")
    return out


def _stops() -> tuple[type[BaseException], ...]:
    """Ctrl-C and the CLI's SIGTERM (graphopt.cli turns it into an exception that unwinds like Ctrl-C)."""
    return (KeyboardInterrupt, Terminated)


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
    batch_sizes: int | Sequence[int] = (1, 32),
    seq_lens: int | Sequence[int] = (64,),
    runtimes: Sequence[str] | None = None,
    objective: str = "p50",
    seed: int = 0,
    strategy: str = "greedy",
    prune_ratios: Sequence[float] = (),
    max_trials: int | None = None,
    threads: int | None = None,
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
    0.005 (default: the project's bar, :data:`graphopt.fidelity_bar.FIDELITY_BAR`).
    ``budget``: seconds or ``"10m"``; the run ends within 10% of it (or after
    one trial, whichever is longer). ``objective``: ``p50``/``p99`` (latency
    ratio vs eager, geometric mean over shapes) or ``throughput`` (at the
    largest batch). ``strategy``: see :mod:`graphopt.tune.strategy`.
    ``max_trials``: stop after this many new trials (the budget still applies).
    ``threads``: torch and runtime threads for every candidate and eager (default: torch's).
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
    if METRICS[metric].source == "eval" and data is None and eval_data is None:  # before any model is loaded
        raise DataSpecError(f"--metric {metric} needs evaluation data (--data ml-100k); without it use --metric topk-overlap")
    drop = METRICS[metric].default_max_drop if max_drop is None else parse_drop(max_drop)
    seconds = parse_budget(budget)
    if threads is not None and threads < 1:
        raise DataSpecError(f"--threads {threads}: must be at least 1")
    if max_trials is not None and max_trials < 1:
        raise DataSpecError(f"--max-trials {max_trials}: must be at least 1")
    if resume and force:
        raise DataSpecError("--resume continues OUT and --force starts it over: pass one of them")
    batch_sizes, seq_lens = _sizes(batch_sizes, "batch-sizes"), _sizes(seq_lens, "seq-lens")
    runtime_names = _check_runtimes(runtimes)
    out = check_output_path(out_dir)
    check_not_model(out, model)  # --force or --resume over the model being tuned would replace it
    if out.exists() and resume and not (out / TUNE_FILE).is_file():
        raise ArtifactError(f"{out} has no {TUNE_FILE}: it is not a graphopt tune output; drop --resume or pick another -o")
    if out.exists() and not resume:
        if not force:
            raise ArtifactError(f"{out} already exists; pass --resume to continue it or --force to start over")
        check_force(out)  # a user's folder or files, or another kind of graphopt output: refused
    budget_clock = Budget(seconds)
    keep_freed_memory()  # eager and every candidate timed under the heap policy a runner sets (graphopt/process.py)
    with _torch_threads(threads):
        tm = resolve_model(model)
        budget_clock.autotunes = autotunes_for(tm.program)
        shapes = _shapes(batch_sizes, seq_lens, tm.program.dynamic_labels(), tm.program)
        eval_batch = max(b for b, _ in shapes)
        td = tune_data(tm, data=data, calib=calib, eval_data=eval_data, batch=eval_batch, seed=seed)
        judge = Judge(metric, drop, td, tm.reference())
        settings = {
            "format": "graphopt.tune/1",
            "model": str(model) if isinstance(model, (str, os.PathLike)) else tm.name,
            "model_name": tm.name,
            "data": data or ("eval_data" if eval_data is not None else None),
            "calib": str(Path(calib).resolve()) if calib else None,
            "calib_sha256": sha256_file(Path(calib)) if calib else None,
            "program": tm.program.fingerprint(),
            "metric": metric, "max_drop": drop, "bar": judge.describe(), "objective": objective,
            "shapes": [[b, s] for b, s in shapes], "runtimes": runtime_names, "seed": seed, "strategy": strategy,
            "budget_s": seconds, "prune_ratios": list(prune_ratios), "threads": threads or torch.get_num_threads(),
            "reference": {k: v for k, v in judge.reference_eval.items()},
            "data_description": td.description, "data_notice": td.notice,
        }
        recorded = _prepare_out(out, settings, resume, force)
        timing = timing or TimingConfig(warmup=2, rounds=5, round_time_s=0.03, max_calls=8)
        confirm_timing = confirm_timing or TimingConfig(warmup=2, rounds=10, round_time_s=0.05, max_calls=10)
        space = build_space(runtime_names, prune_ratios=prune_ratios, cores=threads)
        evaluator = Evaluator(tm, td, judge, shapes, objective, timing, out / WORK_DIR, threads=threads)
        run = SearchRun(out, space, seed, evaluator, budget_clock, recorded, progress, settings, timing, confirm_timing)
        run.max_trials = max_trials
        _restore_best(run, recorded)
        run.say(f"tuning {tm.name}: {len(runtime_names)} runtimes, budget {seconds:.0f}s, bar: {judge.describe()}")
        for note in space.notes:
            run.say(f"note: {note}")
        warnings_ = [w] if (w := load_warning()) else []
        stopped: BaseException | None = None
        try:
            STRATEGIES[strategy](run)
            run.update_reserve()
            if space.int8 and not run.exhausted():
                run.sensitivity()  # for the report's table, when the search did not need it and time is left
            confirmation = run.confirm()
        except _stops() as e:  # OUT/best and trials.jsonl are complete; write the report of what ran
            stopped = e
            how = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
            confirmation = {"done": False, "why": f"{how}; --resume continues"}
        finally:
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
        if not warnings_ and (w := load_warning()) is not None:
            warnings_.append(w.replace("machine is loaded", "machine became loaded during the run"))
        best_trial = run.best
        best = read_artifact(out / BEST_DIR, verify=False) if (out / BEST_DIR).is_dir() else None
        result = TuneResult(out, best, best_trial, run.trials(), confirmation, settings,
                            time.monotonic() - wall, run.computed_sensitivity)
        summary = {
            **settings, "machine": machine_info(), "warnings": warnings_, "space_notes": space.notes,
            "wall_s": result.wall_s,
            "trials": len(run.trials()), "replayed": run.replayed, "not_started_budget": run.skipped_budget,
            "best": best_trial.to_json() if best_trial else None, "confirmation": confirmation,
            "torch_threads": torch.get_num_threads(),
        }
        _write_json(out / RESULT_FILE, summary)
        from graphopt.tune.report import write_report

        write_report(result, summary)
        run.say(f"done in {result.wall_s:.0f}s: {len(run.trials())} trials, best {best_trial.key if best_trial else '-'}")
        if stopped is not None:
            raise stopped
        return result


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _restore_best(run: SearchRun, recorded: list[Trial]) -> None:
    """After --resume: the trial OUT/best holds is the best so far (else the log's fastest)."""
    ok = [t for t in recorded if t.ok]
    held = best_key(run.out)
    if not ok and held is not None:  # was: the eager reference silently replaced a 2.9x best/
        raise DataSpecError(f"--resume: {run.out / TRIALS_FILE} holds no readable trial, yet {run.out / BEST_DIR} holds "
                            f"{held}: the log is damaged or gone; restore it, or start over with --force")
    if not ok:
        return
    match = [t for t in ok if t.key == held]
    run.best = match[-1] if match else max(ok, key=lambda t: (t.objective, -t.n))
    if not match:
        log.warning("%s holds %s, the log's best is %s (its artifact is gone); the next better trial replaces it",
                    run.out / BEST_DIR, held, run.best.key)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str, allow_nan=True) + "\n")
    os.replace(tmp, path)
