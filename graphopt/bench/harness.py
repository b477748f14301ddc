"""``bench()``: build every variant, time them interleaved against eager fp32,
measure accuracy drift, memory and size, and return a :class:`BenchReport`."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.bench.accuracy import make_evaluator
from graphopt.bench.calibration import bench_calibration
from graphopt.bench.memory import explain_memory, measure_in_process, measure_subprocess, predict_variant
from graphopt.bench.peers import build_peers, default_peers
from graphopt.bench.pipelines import check_unique_labels, default_pipelines, parse_pipeline_spec, without_bf16
from graphopt.bench.report import BenchReport, shape_key
from graphopt.bench.shapes import bench_shapes
from graphopt.bench.timing import (
    TimingConfig,
    load_warning,
    machine_info,
    paired_speedup,
    run_interleaved,
    summarize,
)
from graphopt.bench.variants import (
    DEFAULT_RUNTIMES,
    SourceModule,
    Variant,
    baseline_variant,
    build_graphopt_variants,
)
from graphopt.errors import GraphoptError, first_line
from graphopt.hits import UserHits, hit_changes
from graphopt.ir.program import Program
from graphopt.metrics import ranking_drift, score_matrix
from graphopt.outputs import check_replaceable
from graphopt.process import keep_freed_memory

__all__ = ["bench", "Progress"]

log = logging.getLogger(__name__)

#: progress(message, done, total): called as the run advances (the CLI draws a bar)
Progress = Callable[[str, float, float], None]

#: rows each shape's fidelity (top-k overlap, drift) is measured on: the timed batch and more
#: seeded batches of the same shape (seeds after the bench's, apart from calibration's 1000+).
#: One 32-row batch estimates top-10 overlap loosely: bert4rec:base int8-mixed-bf16 compiled,
#: over 8 batches of 32 (AMX Xeon, 2026-12-04): graphopt's guarded 0.9875-0.9938, PT2E's
#: 0.975-0.99 (mean 0.984, 0.994 on the batch the bench timed); at batch 1 one row is 0.9 or 1.0
FIDELITY_ROWS = 256


class _Model:
    """What was asked for: the Program, the original module (if known) and an input maker."""

    def __init__(self, model: Any):
        self.spec: str | None = None
        self.zoo: Any = None
        if isinstance(model, str):
            self.spec = model
            from graphopt.rec.resolve import load_program

            if Path(model).exists() or model.endswith(".pt2"):
                self.program = load_program(model)
            else:
                from graphopt.rec.zoo import load_model

                self.zoo = load_model(model)
                self.program = self.zoo.capture()
        elif isinstance(model, Program):
            self.program = model
        elif hasattr(model, "module") and hasattr(model, "make_inputs") and hasattr(model, "capture"):
            self.zoo = model
            self.spec = model.name
            self.program = model.capture()
        else:
            raise GraphoptError(
                f"bench takes a model name, a Program or a ZooModel, got {type(model).__name__}; "
                "capture an nn.Module with graphopt.capture first"
            )
        if self.zoo is not None:
            self.source: torch.nn.Module = SourceModule(self.zoo.module.eval(), self.program.input_names)
        else:
            self.source = SourceModule(self.program.gm, self.program.input_names, by_keyword=False)

    def inputs(self, batch: int, seq: int | None, seed: int) -> tuple[torch.Tensor, ...]:
        if self.zoo is not None:
            made = self.zoo.make_inputs(batch=batch, seq=seq, seed=seed)
            return tuple(made[n] for n in self.program.input_names)
        return tuple(self.program.sample_inputs(batch=batch, seq=seq, seed=seed))


def _needs_calibration(specs: Sequence[Any], peer_names: Sequence[str]) -> bool:
    from graphopt.transform.pipeline import parse_pipeline

    if any(name.startswith("torchao-pt2e") for name in peer_names):
        return True
    for spec in specs:
        try:
            if spec.text and any("calibration_data" in p.requires for p in parse_pipeline(spec.text)):
                return True
        except GraphoptError:
            continue  # reported when the variant is built
    return False


def _fidelity_batches(batch: int) -> int:
    """Batches of ``batch`` rows, the timed one included, that hold :data:`FIDELITY_ROWS` rows."""
    return max(1, -(-FIDELITY_ROWS // max(1, batch)))


def _ranks_items(outputs: tuple[torch.Tensor, ...], k: int) -> bool:
    """Whether the first output ranks more than ``k`` candidates per row (a row per user, so rows of
    more batches pool); a batch-ranked output (one score per row, CTR) is a ranking of that batch."""
    ranked = score_matrix(outputs[0].detach().float(), k) if outputs and outputs[0].is_floating_point() else None
    return ranked is not None and ranked[1] == "items"


def _pooled(outs: Sequence[tuple[torch.Tensor, ...]], batch: int) -> tuple[torch.Tensor, ...]:
    """Each output of several calls, rows concatenated (outputs whose first dim is not the
    batch, a scalar or a pooled statistic, are taken from the first call)."""
    first = outs[0]
    return tuple(torch.cat([o[i] for o in outs]) if t.dim() >= 1 and t.shape[0] == batch else t
                 for i, t in enumerate(first))


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _on_cpu(out: Any) -> tuple[torch.Tensor, ...]:
    """Outputs compared with eager's, on the CPU (a CUDA runtime's, TensorRT's, included)."""
    return tuple(o.cpu() for o in _as_tuple(out))


def bench(
    model: Any,
    pipelines: Sequence[str] | None = None,
    runtimes: Sequence[str] | None = None,
    *,
    peers: bool | Sequence[str] = False,
    batch_sizes: Sequence[int] = (1, 32),
    seq_lens: Sequence[int] = (64,),
    threads: int | None = None,
    out_dir: str | Path | None = None,
    force: bool = False,
    quick: bool = False,
    timing: TimingConfig | None = None,
    eval_data: Any = None,
    calibration_data: Sequence[Any] | None = None,
    validation_data: Any = None,
    k: int = 10,
    memory: bool = True,
    keep_artifacts: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
) -> BenchReport:
    """Benchmark (pipeline, runtime) variants and peers against eager fp32.

    ``model``: zoo name (``"bert4rec:base"``), saved Program path, Program or
    ZooModel. ``pipelines``: pipeline texts, optionally labelled
    (``"bf16=O2,cast{dtype=bf16}"``; ``"none"`` = unoptimized); default
    :func:`~graphopt.bench.pipelines.default_pipelines` (``DEFAULT_PIPELINES``, plus ``Os``
    for embedding-dominated models; less the bf16 ones on a CPU without bf16 GEMM kernels,
    :func:`~graphopt.bench.pipelines.without_bf16`, with a note). ``runtimes``: default every runtime; an
    unavailable one is reported as skipped with the reason. ``peers``: True
    for every peer recipe (less the bf16 ones on a CPU without bf16 GEMM kernels, with a note:
    :func:`~graphopt.bench.peers.default_peers`) or a list of names from :data:`PEERS`.
    ``eval_data``: :class:`~graphopt.bench.accuracy.EvalData` (batches,
    targets, seen) or a callable ``evaluate(fn) -> {"hr@10": .., "ndcg@10": ..}``;
    without it accuracy is drift and ranking agreement with eager only.
    ``validation_data`` (same forms as ``eval_data``; data apart from it): what the
    int8 accuracy guard holds HR/NDCG (AUC/logloss) on while choosing layers
    (``graphopt.optimize(..., validation=...)``); never the evaluation data itself.
    ``out_dir``: write report.json, report.md and PNG plots there (atomic;
    an existing folder needs ``force``). Timings are never compared across
    runs: every ratio is measured pair by pair within this run. Every variant, eager
    and the peers included, runs under the heap policy a graphopt runner sets
    (:func:`graphopt.process.keep_freed_memory`), set before the first is timed.
    """
    keep_freed_memory()
    if out_dir is not None:  # refuse the output folder before the run, not after it
        check_replaceable(out_dir, force=force)
    config = timing or (TimingConfig.quick() if quick else TimingConfig())
    specs = None if pipelines is None else [parse_pipeline_spec(p) for p in pipelines]  # None: per model, below
    runtimes = list(DEFAULT_RUNTIMES if runtimes is None else runtimes)
    peer_names, peer_note = default_peers() if peers is True else (list(peers or []), None)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="graphopt-bench-"))
    variants: list[Variant] = []
    try:
        return _run(
            model, specs, runtimes, peer_names, batch_sizes, seq_lens, threads, out_dir, force, config,
            eval_data, calibration_data, validation_data, k, memory, keep_artifacts, seed, progress, work,
            variants, [peer_note] if peer_note else [],
        )
    finally:
        for v in variants:
            v.release()
        torch.set_num_threads(old_threads)
        shutil.rmtree(work, ignore_errors=True)


def _run(
    model: Any, specs: list, runtimes: list[str], peer_names: list[str], batch_sizes: Sequence[int],
    seq_lens: Sequence[int], threads: int | None, out_dir: str | Path | None, force: bool,
    config: TimingConfig, eval_data: Any, calibration_data: Any, validation_data: Any, k: int, memory: bool,
    keep_artifacts: bool, seed: int, progress: Progress | None, work: Path, variants: list[Variant],
    notes: list[str],
) -> BenchReport:
    warnings_: list[str] = []
    if (w := load_warning()) is not None:
        warnings_.append(w)
    started = time.time()
    state = {"done": 0.0, "total": 1.0}

    def tick(message: str, steps: float = 1.0) -> None:
        state["done"] = min(state["total"], state["done"] + steps)
        if progress is not None:
            progress(message, state["done"], state["total"])

    what = _Model(model)
    program = what.program
    if specs is None:
        pipelines, left_out = without_bf16(default_pipelines(program))
        specs = [parse_pipeline_spec(p) for p in pipelines]
        notes += [left_out] if left_out else []
    check_unique_labels(specs)
    shapes = bench_shapes(program, batch_sizes, seq_lens, notes)
    n_builds = 1 + len(specs) * len(runtimes) + len(peer_names)
    state["total"] = float(
        n_builds + len(shapes) * (config.rounds + 1) + (n_builds if eval_data is not None else 0) + (n_builds if memory else 0)
    )
    tick(f"{program.name}: eager baseline", 0)

    if calibration_data is None and _needs_calibration(specs, peer_names):
        calibration_data, note = bench_calibration(what.inputs, shapes)
        notes.append(note)
    notes.append(f"fidelity vs eager (top-{k} overlap, drift) per shape on at least {FIDELITY_ROWS} rows where a row "
                 f"ranks items: the timed batch and more of its shape (seeds {seed + 1}+); timing on the timed batch only")
    baseline = baseline_variant(program, what.source if what.zoo is not None else None, what.spec)
    variants.append(baseline)
    tick("baseline ready")
    built = build_graphopt_variants(
        program, specs, runtimes, work,
        calibration_data=calibration_data, threads=threads,
        validation=make_evaluator(validation_data, input_names=program.input_names)
        if validation_data is not None else None,
        on_built=lambda v: tick(f"built {v.name} ({v.status})"),
    )
    variants += built
    if peer_names:
        tick("building peers", 0)
        peer_variants = build_peers(
            what.source, program, work, peers=peer_names, threads=threads, calibration_data=calibration_data,
        )
        for v in peer_variants:
            tick(f"built {v.name} ({v.status})")
        variants += peer_variants

    results: list[dict[str, Any]] = []
    last_inputs: tuple[torch.Tensor, ...] = ()
    for batch, seq in shapes:
        key = shape_key(batch, seq)
        inputs = what.inputs(batch, seq, seed)
        last_inputs = inputs
        tick(f"{key}: first calls", 0)
        start = time.perf_counter()
        reference = _as_tuple(baseline.fn(*inputs))  # type: ignore[misc]
        baseline.first_call_s[key] = time.perf_counter() - start
        more = [what.inputs(batch, seq, seed + i) for i in range(1, _fidelity_batches(batch))] \
            if _ranks_items(reference, k) else []  # fidelity only; a batch-ranked output stays one batch
        pooled_reference = _pooled([reference, *(_as_tuple(baseline.fn(*x)) for x in more)], batch)  # type: ignore[misc]
        rows: dict[str, dict[str, Any]] = {}
        fns: dict[str, Callable[[], Any]] = {}
        for v in variants:
            row: dict[str, Any] = {"shape": key, "batch": batch, "seq": seq, "variant": v.name}
            rows[v.name] = row
            if not v.ok:
                row.update(status=v.status, reason=v.reason)
                continue
            try:
                if v is baseline:
                    out = reference
                else:
                    start = time.perf_counter()
                    out = _on_cpu(v.fn(*inputs))  # type: ignore[misc]
                    v.first_call_s[key] = time.perf_counter() - start
                if len(out) != len(reference) or any(tuple(o.shape) != tuple(r.shape) for o, r in zip(out, reference)):
                    raise GraphoptError(
                        f"outputs {[list(o.shape) for o in out]} do not match eager's {[list(r.shape) for r in reference]}"
                    )
                outs = [out, *(_on_cpu(v.fn(*x)) for x in more)]  # type: ignore[misc]
                row["accuracy"] = ranking_drift(_pooled(outs, batch), pooled_reference, k)
                row["accuracy"]["rows"] = batch * len(outs)
            except Exception as e:  # noqa: BLE001 - reported per variant and shape
                row.update(status="failed", reason=first_line(e))
                continue
            row["status"] = "ok"
            fns[v.name] = (lambda f=v.fn, xs=inputs: f(*xs))  # type: ignore[misc]
        tick(f"{key}: first calls done")
        failures: dict[str, str] = {}
        samples = run_interleaved(
            fns, config, on_round=lambda r, n, key=key: tick(f"{key}: round {r}/{n}"), failures=failures
        )
        base_samples = samples.get(baseline.name)
        for name, row in rows.items():
            if name in failures:
                row.update(status="failed", reason=failures[name])
            if row.get("status") != "ok":
                continue
            row["latency"] = summarize(samples[name], batch)
            row["speedup"] = paired_speedup(base_samples, samples[name]) if base_samples else {}
            row["samples_s"] = samples[name].rounds
        results += rows.values()
    for v in variants:  # a variant that failed at every shape failed, with the first reason
        mine = [r for r in results if r["variant"] == v.name]
        if v.ok and mine and all(r.get("status") != "ok" for r in mine):
            v.fail(mine[0].get("reason", "failed at every shape"))

    eval_reference: dict[str, float] = {}
    if eval_data is not None:
        evaluator = make_evaluator(eval_data, per_user=True, input_names=program.input_names)
        per_user: dict[str, UserHits] = {}
        for v in variants:
            if v.ok:
                try:
                    metrics = dict(evaluator(v.fn))  # type: ignore[arg-type]
                    if isinstance(users := metrics.pop("per_user", None), UserHits):
                        per_user[v.name] = users
                    v.eval = {key: float(val) for key, val in metrics.items()}
                except Exception as e:  # noqa: BLE001
                    v.eval = {}
                    v.notes.append(f"evaluation failed: {first_line(e)}")
            tick(f"evaluated {v.name}")
        eval_reference = dict(baseline.eval)
        if baseline.name in per_user:
            for v in variants:
                if v.name in per_user and v is not baseline:
                    v.eval_users = hit_changes(per_user[baseline.name], per_user[v.name])

    if memory and last_inputs:
        for v in variants:
            if v.ok:
                tick(f"memory: {v.name}", 0)
                if v.memory_target is not None:
                    v.memory = measure_subprocess(v.memory_target, last_inputs, threads=threads)
                else:
                    v.memory = measure_in_process(v.fn, last_inputs)  # type: ignore[arg-type]
                v.memory["shape"] = shape_key(*shapes[-1])
                if v.memory_model is not None:
                    v.memory["predicted"] = predict_variant(v.memory_model, *shapes[-1])
            tick(f"memory: {v.name} done")
        explain_memory(variants)
    if not warnings_ and (w := load_warning()) is not None:
        warnings_.append(w.replace("machine is loaded", "machine became loaded during the run"))

    report = BenchReport(
        model=program.name,
        created=started,
        duration_s=time.time() - started,
        machine=machine_info(),
        config={
            "pipelines": [{"label": s.label, "text": s.text} for s in specs],
            "runtimes": runtimes,
            "peers": peer_names,
            "shapes": [{"batch": b, "seq": s} for b, s in shapes],
            "threads": threads or torch.get_num_threads(),
            "k": k,
            "seed": seed,
            "timing": {
                "warmup": config.warmup, "rounds": config.rounds,
                "round_time_s": config.round_time_s, "max_calls": config.max_calls,
            },
            "baseline": baseline.runtime,
        },
        variants=[v.to_json() for v in variants],
        results=results,
        eval_reference=eval_reference,
        warnings=warnings_,
        notes=notes,
    )
    if out_dir is not None:
        report.save(out_dir, force=force, artifacts=work if keep_artifacts else None)
    return report
