"""Variants: what the harness times. A variant is (pipeline, runtime) built
from the captured Program, the eager baseline, or a peer recipe.

Building a graphopt variant = optimize (once per pipeline, shared by every
runtime) + lower to an artifact folder + load a Runner; each step is timed
and the artifact's size on disk recorded. A variant that cannot be built is
kept, with status ``skipped`` (runtime unavailable here, pass not in this
build) or ``failed`` (it raised) and a one-line reason: the report shows it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.bench.memory import memory_model
from graphopt.bench.pipelines import PipelineSpec
from graphopt.errors import BackendUnavailableError, GraphoptError, first_line
from graphopt.ir.capture import _flatten_outputs
from graphopt.ir.program import Program
from graphopt.passlib.calibration import default_calibration
from graphopt.runtime import Runner, available_runtimes, get_runtime, load, lower
from graphopt.transform.pipeline import parse_pipeline

__all__ = [
    "Variant",
    "DEFAULT_RUNTIMES",
    "runtime_status",
    "baseline_variant",
    "build_graphopt_variants",
    "dir_size",
    "runner_options",
    "SourceModule",
]

log = logging.getLogger(__name__)

DEFAULT_RUNTIMES = ("eager", "torchscript", "onnxruntime", "inductor", "tensorrt")


def dir_size(path: Path) -> int:
    """Bytes of every file under ``path`` (a file: its size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Variant:
    """One thing to time. ``fn(*inputs) -> tuple of tensors`` when status is ok."""

    name: str
    kind: str  # baseline | graphopt | peer
    pipeline: str = ""
    runtime: str = "eager"
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    fn: Callable[..., Sequence[torch.Tensor]] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # optimize_s, lower_s, load_s, build_s
    first_call_s: dict[str, float] = field(default_factory=dict)  # shape key -> seconds
    size_bytes: int | None = None
    size_kind: str = ""  # artifact | onnx | parameters (in memory)
    memory_target: dict[str, Any] | None = None  # how a subprocess can load it alone
    memory_model: Any = None  # graphopt.transform.memory.MemoryAnalysis of the Program it runs (None: peers)
    memory: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)
    #: with per-user evaluation: users whose hit changed vs the baseline (gained, lost) and
    #: the smallest baseline margin among them (graphopt.hits.hit_changes)
    eval_users: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    close: Callable[[], None] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, reason: str, status: str = "failed") -> Variant:
        self.status, self.reason, self.fn = status, reason, None
        self.release()
        return self

    def release(self) -> None:
        if self.close is not None:
            with contextlib.suppress(Exception):
                self.close()
            self.close = None

    @property
    def compile_s(self) -> float | None:
        """Time from the input model to an answer: build steps + the first call."""
        if self.kind == "baseline" or self.status != "ok":
            return None
        build = sum(v for k, v in self.timings.items() if k.endswith("_s"))
        first = next(iter(self.first_call_s.values()), None)
        if not self.timings and first is None:
            return None
        return build + (first or 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "pipeline": self.pipeline,
            "runtime": self.runtime,
            "status": self.status,
            "reason": self.reason,
            "timings": self.timings,
            "first_call_s": self.first_call_s,
            "compile_s": self.compile_s,
            "size_bytes": self.size_bytes,
            "size_kind": self.size_kind,
            "memory": self.memory,
            "eval": self.eval,
            "eval_users": self.eval_users,
            "notes": self.notes,
        }


# ------------------------------------------------------------------ runtimes
def runtime_status(names: Sequence[str]) -> dict[str, tuple[bool, str]]:
    """name -> (available, reason) for each requested runtime."""
    table = available_runtimes()
    out: dict[str, tuple[bool, str]] = {}
    for n in names:
        if n in table:
            out[n] = (table[n].available, table[n].reason)
            continue
        try:  # a third-party or alias name: ask the registry (unknown names say so)
            reason = get_runtime(n).unavailable_reason()
            out[n] = (reason is None, reason or "")
        except GraphoptError as e:
            out[n] = (False, first_line(e))
    return out


def runner_options(runtime: str, threads: int | None) -> dict[str, Any]:
    """Load options for timing: the thread count where the runtime has one, and
    no idle spinning (a spinning pool slows the variant timed after it)."""
    declared = {o.name for o in get_runtime(runtime).runner_options}
    options: dict[str, Any] = {"spin": False} if "spin" in declared else {}
    if threads:
        for name in ("threads", "intra_op_threads", "num_threads"):
            if name in declared:
                options[name] = threads
                break
    return options


def _runner_fn(runner: Runner) -> tuple[Callable[..., Sequence[torch.Tensor]], Callable[[], None]]:
    """An active runner as the harness's callable (synchronizing a device after
    each call, so timing includes its work) and how to release it."""
    runner.activate()
    on_device = str(runner.device) != "cpu"

    def call(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = runner(*inputs)
        if on_device:
            runner.synchronize()
        return out

    return call, runner.deactivate


# ------------------------------------------------------------------ baseline
class SourceModule(torch.nn.Module):
    """The user's model called with the Program's input names, returning a
    flat tuple of tensors (peers and the baseline run this)."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str], by_keyword: bool = True):
        super().__init__()
        self.model = module
        self.names = list(names)
        self.by_keyword = by_keyword

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.names, args))) if self.by_keyword else self.model(*args)
        return tuple(_flatten_outputs(out)[1])


def baseline_variant(program: Program, source: torch.nn.Module | None, model_spec: str | None) -> Variant:
    """Eager fp32 of the original model (the nn.Module when known, else the Program)."""
    if source is not None:
        module = source

        def fn(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.inference_mode():
                return module(*inputs)

        size = sum(p.numel() * p.element_size() for p in module.state_dict().values())
        v = Variant("eager", "baseline", pipeline="", runtime="eager (original module)", fn=fn)
        v.size_bytes, v.size_kind = size, "parameters"
        v.memory_target = {"kind": "zoo", "name": model_spec} if model_spec else None
        v.memory_model = memory_model(program)
        return v
    v = Variant("eager", "baseline", pipeline="", runtime="eager (Program)", fn=program)
    v.size_bytes, v.size_kind = program.parameter_bytes(), "parameters"
    v.memory_model = memory_model(program)
    return v


# ------------------------------------------------------------ graphopt variants
def build_graphopt_variants(
    program: Program,
    pipelines: Sequence[PipelineSpec],
    runtimes: Sequence[str],
    work_dir: Path,
    *,
    calibration_data: Sequence[Any] | None = None,
    threads: int | None = None,
    validation: Callable[[Callable[..., Any]], Any] | None = None,
    on_built: Callable[[Variant], None] | None = None,
) -> list[Variant]:
    """Every (pipeline, runtime) variant, built or marked skipped/failed (``validation``:
    see ``graphopt.optimize``)."""
    from graphopt.transform.optimize import optimize

    status = runtime_status(runtimes)
    variants: list[Variant] = []
    built: dict[str, str] = {}  # Program.fingerprint() -> label of each pipeline lowered so far

    def done(v: Variant) -> None:
        variants.append(v)
        if v.status != "ok":
            log.info("variant %s %s: %s", v.name, v.status, v.reason)
        if on_built is not None:
            on_built(v)

    for spec in pipelines:
        names = [f"{spec.label} @ {rt}" for rt in runtimes]
        optimized: Program | None = None
        optimize_s = 0.0
        reason = ""
        try:
            if spec.text:
                pipeline = parse_pipeline(spec.text)
                needs_data = any("calibration_data" in p.requires for p in pipeline)
                data = calibration_data if calibration_data is not None else (default_calibration(program) if needs_data else None)
                start = time.perf_counter()
                optimized, opt_report = optimize(program, pipeline, calibration_data=data, validation=validation)
                optimize_s = time.perf_counter() - start
                # what the accuracy guard kept float and why, in the report's notes of the variant
                guard_notes = [n for rec in opt_report.passes for n in rec.notes
                               if n.startswith(("accuracy guard: the", "accuracy guard: validation"))]
            else:
                optimized, guard_notes = program, []
        except GraphoptError as e:
            reason = f"pipeline '{spec.text}': {first_line(e)}"
            skipped = type(e).__name__ in ("PipelineParseError",)  # pass not in this build
            for name, rt in zip(names, runtimes):
                done(Variant(name, "graphopt", spec.text, rt).fail(reason, "skipped" if skipped else "failed"))
            continue
        except Exception as e:  # noqa: BLE001 - a pass that crashes is a failed variant, not a crashed bench
            reason = f"pipeline '{spec.text}': {first_line(e)}"
            for name, rt in zip(names, runtimes):
                done(Variant(name, "graphopt", spec.text, rt).fail(reason))
            continue
        fingerprint = optimized.fingerprint()
        same = built.get(fingerprint)
        if same is not None:
            # e.g. int8 where the accuracy guard kept every layer float: timing it again would only
            # time noise (and a star on it would credit int8 with fp32's speed)
            why = f"the same Program as '{same}'" + (f" ({guard_notes[-1]})" if guard_notes else "")
            for name, rt in zip(names, runtimes):
                done(Variant(name, "graphopt", spec.text, rt, notes=list(guard_notes)).fail(why, "skipped"))
            continue
        built[fingerprint] = spec.label
        model = memory_model(optimized)
        for name, rt in zip(names, runtimes):
            v = Variant(name, "graphopt", spec.text, rt, notes=list(guard_notes))
            v.memory_model = model
            available, why = status[rt]
            if not available:
                done(v.fail(f"{rt}: {why}", "skipped"))
                continue
            if spec.text:
                v.timings["optimize_s"] = optimize_s
            out_dir = work_dir / f"{spec.label}-{rt}".replace("/", "_").replace(" ", "_")
            try:
                start = time.perf_counter()
                artifact = lower(optimized, rt, out_dir, force=True)
                v.timings["lower_s"] = time.perf_counter() - start
                backend_info = artifact.manifest.get("backend", {})
                v.notes += [f"{rt}: {backend_info[k]}" for k in ("epilogue_fusion_off", "autotune_rejected")
                            if backend_info.get(k)]
                start = time.perf_counter()
                v.fn, v.close = _runner_fn(load(out_dir, **runner_options(rt, threads)))
                v.timings["load_s"] = time.perf_counter() - start
                v.size_bytes, v.size_kind = dir_size(out_dir), "artifact"
                v.memory_target = {"kind": "artifact", "path": str(out_dir)}
            except BackendUnavailableError as e:
                v.fail(f"{rt}: {first_line(e)}", "skipped")
            except Exception as e:  # noqa: BLE001 - lowering failures are reported per variant
                v.fail(f"{rt}: {first_line(e)}")
            done(v)
    return variants
