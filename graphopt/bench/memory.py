"""Peak resident memory of one variant, measured alone.

A variant whose artifact is on disk (a graphopt artifact folder, an ONNX
file, the zoo model by name) is measured in a fresh subprocess
(``python -m graphopt.bench.memory``): it imports torch, records its RSS,
loads the variant, runs it a few times on the saved inputs and reports the
peak (``VmHWM``). ``peak_mb`` is that peak; ``model_mb`` is the peak minus the
RSS after imports, i.e. what the model and its run add.

Variants that live only in this process (``torch.compile`` peers) cannot be
re-created cheaply in another process; for those the peak RSS growth during
the run is measured in-process (the kernel's high-water mark is reset first),
which excludes the weights already loaded. ``method`` says which was done.

:func:`measure_allocations` measures what the memory analysis predicts: the
peak of live CPU tensor allocations while a Program's GraphModule runs
eagerly (torch profiler, ``profile_memory=True``: every allocation and free
through PyTorch's CPU allocator, in order), above what was allocated before
the call (weights, inputs). :func:`allocations_by_node` attributes them to
graph nodes (the fx Interpreter, one ``record_function`` per node) to explain
a difference. :func:`predict_variant` is the analysis' side for the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import first_line
from graphopt.process import reset_peak_rss, rss_kb

__all__ = [
    "measure_in_process",
    "measure_subprocess",
    "measure_allocations",
    "allocations_by_node",
    "memory_model",
    "predict_variant",
    "explain_memory",
]

log = logging.getLogger(__name__)


def measure_in_process(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], iters: int = 3) -> dict[str, Any]:
    """Peak RSS growth while ``fn`` runs (weights already resident are not counted)."""
    if not reset_peak_rss():
        return {"method": "unavailable", "reason": "cannot reset the peak RSS (/proc/self/clear_refs) here"}
    before, _ = rss_kb()
    for _ in range(iters):
        fn(*inputs)
    _, peak = rss_kb()
    return {
        "method": "in-process (run growth only; weights excluded)",
        "run_mb": max(0, peak - before) / 1024,
    }


def measure_subprocess(
    target: dict[str, Any], inputs: Sequence[torch.Tensor], *, iters: int = 3, threads: int | None = None, timeout: float = 600
) -> dict[str, Any]:
    """Load ``target`` alone in a fresh Python process and report its peak RSS."""
    with tempfile.TemporaryDirectory(prefix="graphopt-mem-") as tmp:
        inputs_path = Path(tmp) / "inputs.pt"
        torch.save(tuple(inputs), inputs_path)
        cmd = [sys.executable, "-m", "graphopt.bench.memory", json.dumps(target), str(inputs_path), "--iters", str(iters)]
        if threads:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"method": "subprocess", "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": "subprocess", "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(lines[-1])
    return {
        "method": "subprocess (alone)",
        "peak_mb": result["peak_kb"] / 1024,
        "model_mb": max(0, result["peak_kb"] - result["start_kb"]) / 1024,
        "start_mb": result["start_kb"] / 1024,
        "load_mb": max(0, result["loaded_kb"] - result["start_kb"]) / 1024,
        "load_file_mb": result.get("load_file_kb", 0) / 1024,
        "run_mb": max(0, result["peak_kb"] - result["loaded_kb"]) / 1024,
    }


# ---------------------------------------------------------------- allocations (profiler)
def _profiled(run: Callable[[], Any]) -> tuple[Any, Any]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
    return out, prof.profiler.kineto_results


def measure_allocations(gm: torch.nn.Module, inputs: Sequence[torch.Tensor], warmup: int = 1) -> dict[str, int]:
    """Peak bytes of CPU tensor storage live at once while ``gm(*inputs)`` runs,
    counted from the call (weights and inputs, allocated before, are not), and
    what is still held after it (the outputs). ``warmup`` calls first, so lazy
    one-time allocations do not count."""
    with torch.no_grad():
        for _ in range(warmup):
            gm(*inputs)
    out, results = _profiled(lambda: gm(*inputs))
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted(
        (e for e in results.events() if e.name() == "[memory]" and e.device_type() == cpu),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    del out
    return {"peak_bytes": peak, "retained_bytes": live, "allocations": sum(e.nbytes() > 0 for e in events)}


def allocations_by_node(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """Node name -> the most bytes allocated at once inside that node (its
    output(s) and its kernels' scratch), from one profiled run of the graph
    through the fx Interpreter (which frees values after their last use too)."""
    from torch._C._profiler import _EventType
    from torch.profiler import record_function

    class Tagged(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            with record_function("graphopt.node::" + n.name):
                return super().run_node(n)

    with torch.no_grad():
        Tagged(gm).run(*inputs)
    _, results = _profiled(lambda: Tagged(gm).run(*inputs))
    events: dict[str, list[tuple[int, int]]] = {}

    def walk(event: Any, node: str | None) -> None:
        if event.name.startswith("graphopt.node::"):
            node = event.name.split("::", 1)[1]
        if event.tag == _EventType.Allocation and node is not None:
            events.setdefault(node, []).append((event.start_time_ns, event.extra_fields.alloc_size))
        for child in event.children:
            walk(child, node)

    for root in results.experimental_event_tree():
        walk(root, None)
    peaks: dict[str, int] = {}
    for node, allocs in events.items():
        live = peak = 0
        for _, size in sorted(allocs):
            live += size
            peak = max(peak, live)
        peaks[node] = peak
    return peaks


def memory_model(program: Any) -> Any:
    """The memory analysis of ``program`` (None, logged, when it cannot be computed:
    a prediction is a report column, never a reason to fail the bench)."""
    from graphopt.transform.memory import analyze_memory

    try:
        return analyze_memory(program)
    except Exception as e:  # noqa: BLE001
        log.warning("memory analysis of %s failed: %s", getattr(program, "name", "?"), first_line(e))
        return None


def predict_variant(model: Any, batch: int | None, seq: int | None) -> dict[str, Any]:
    """A memory analysis (or a Program) at one shape, as the report's ``predicted`` record (MB = 2**20 bytes)."""
    from graphopt.transform.memory import MemoryAnalysis

    analysis = model if isinstance(model, MemoryAnalysis) else memory_model(model)
    if analysis is None:
        return {"error": "the memory analysis failed (see the log)"}
    estimate = analysis.at(batch=batch, seq=seq)
    return {
        "weights_mb": estimate.weights / 2**20,
        "activations_mb": estimate.activations / 2**20,
        "inputs_mb": estimate.inputs / 2**20,
        "peak_at": estimate.peak_node,
    }


#: a variant's measured memory beyond eager's by more than this (MB) gets a reason
_EXCESS_MB = 4.0


def explain_memory(variants: Sequence[Any], eager: str = "eager") -> None:
    """Complete each measured variant's ``memory`` record in place: ``overhead_mb``
    (measured over imports minus predicted weights + activations: the runtime's
    own memory) and, for a variant that needs more than eager, ``why``: which
    part exceeds eager's, measured against the same part of eager's run. Loading:
    RSS after loading beyond the variant's weights, with the file-backed part
    (mapped artifact files: a compiled library with the weights inside, a
    memory-mapped model) told apart from anonymous memory (copies the runtime
    makes: prepacked or converted weights next to the originals, deserialization
    buffers the allocator keeps). Running: a larger predicted activation peak
    than eager's (the graph itself; said of variants that run the Program
    eagerly, as the prediction models), then RSS growth during the calls beyond
    the predicted peak (arenas, workspaces, allocator caching)."""
    base = next((v.memory for v in variants if v.name == eager), {})
    base_pred = base.get("predicted", {})
    for v in variants:
        mem, pred = v.memory, v.memory.get("predicted", {})
        if "model_mb" not in mem or "weights_mb" not in pred:
            continue
        mem["overhead_mb"] = mem["model_mb"] - pred["weights_mb"] - pred["activations_mb"]
        if v.name == eager or "model_mb" not in base or "weights_mb" not in base_pred:
            continue
        if mem["model_mb"] <= base["model_mb"] + _EXCESS_MB:
            continue
        reasons = []
        load_over = mem.get("load_mb", 0.0) - pred["weights_mb"]
        base_load_over = base.get("load_mb", 0.0) - base_pred["weights_mb"]
        if load_over - base_load_over > _EXCESS_MB:
            mapped = mem.get("load_file_mb", 0.0) - base.get("load_file_mb", 0.0)
            anon = load_over - base_load_over - max(0.0, mapped)
            parts = []
            if mapped > _EXCESS_MB:
                parts.append(f"{mapped:.0f} MB file-backed (the artifact's files mapped into memory, "
                             "e.g. weights embedded in a compiled library)")
            if anon > _EXCESS_MB:
                parts.append(f"{anon:.0f} MB anonymous (copies made while loading: prepacked or converted "
                             "weights kept next to the originals, or deserialization buffers the allocator keeps)")
            reasons.append(
                f"loading holds {mem['load_mb']:.0f} MB for {pred['weights_mb']:.0f} MB of weights "
                f"(eager: {base['load_mb']:.0f} MB for {base_pred['weights_mb']:.0f} MB): "
                + ("; ".join(parts) or f"{load_over - base_load_over:.0f} MB more")
            )
        runs_program = str(getattr(v, "runtime", "")).startswith("eager")  # other runtimes plan their own buffers
        if runs_program and pred["activations_mb"] - base_pred["activations_mb"] > _EXCESS_MB:
            reasons.append(
                f"its graph needs more while running: predicted activation peak {pred['activations_mb']:.1f} MB "
                f"at {pred.get('peak_at', '?')} (eager: {base_pred['activations_mb']:.1f} MB), e.g. weights "
                "dequantized or converted at every call"
            )
        run_over = mem.get("run_mb", 0.0) - pred["activations_mb"]
        base_run_over = base.get("run_mb", 0.0) - base_pred["activations_mb"]
        if run_over - base_run_over > _EXCESS_MB:
            reasons.append(
                f"a run adds {mem['run_mb']:.0f} MB (eager: {base['run_mb']:.0f} MB) where the graph's activations "
                f"peak at {pred['activations_mb']:.1f} MB: memory the runtime or the allocator holds beyond the live "
                "tensors (arenas, workspaces, freed blocks not returned to the system)"
            )
        mem["why"] = reasons or [
            f"{mem['model_mb'] - base['model_mb']:.0f} MB more than eager, neither loading nor running alone "
            "explains it (allocator or library state)"
        ]


# ---------------------------------------------------------------- subprocess side
def _load_target(target: dict[str, Any], threads: int | None) -> Callable[..., Any]:
    kind = target["kind"]
    if kind == "artifact":
        from graphopt.bench.variants import runner_options
        from graphopt.runtime import load, read_artifact

        runtime = read_artifact(target["path"], verify=False).runtime
        return load(target["path"], **runner_options(runtime, threads)).activate()
    if kind == "onnx":
        from graphopt.bench.ort_peer import ort_session

        session = ort_session(target["path"], threads)
        names = [i.name for i in session.get_inputs()]
        return lambda *xs: session.run(None, {n: x.numpy() for n, x in zip(names, xs)})
    if kind == "program":
        from graphopt.ir.program import Program

        return Program.load(target["path"])
    if kind == "zoo":
        from graphopt.bench.variants import SourceModule
        from graphopt.rec.zoo import load_model

        zoo = load_model(target["name"])
        module = SourceModule(zoo.module.eval(), list(zoo.example_inputs))

        def run(*xs: torch.Tensor) -> Any:
            with torch.inference_mode():
                return module(*xs)

        return run
    raise SystemExit(f"unknown memory target kind {kind!r}")


def _preimport(target: dict[str, Any]) -> None:
    """Import the libraries the target needs before the start RSS is read, so
    ``model_mb`` counts the model and its run, not a library's import."""
    kind = target["kind"]
    wanted = {"onnx": ["onnxruntime"], "zoo": ["transformers", "graphopt.rec.zoo"], "program": []}.get(kind, [])
    if kind == "artifact":
        wanted = ["graphopt.runtime"]
        try:
            from graphopt.runtime import canonical_runtime

            manifest = json.loads((Path(target["path"]) / "manifest.json").read_text())
            name = canonical_runtime(str(manifest.get("runtime", "")), note=False)
            wanted += [f"graphopt.runtimes.{name}"] + (["onnxruntime"] if name in ("onnxruntime", "tensorrt") else [])
        except (OSError, ValueError):
            pass
    import importlib

    for module in wanted:
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphopt.bench.memory")
    parser.add_argument("target", help="JSON: {kind: artifact|onnx|program|zoo, path|name}")
    parser.add_argument("inputs", help="torch.save'd tuple of input tensors")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = torch.load(args.inputs)
    target = json.loads(args.target)
    _preimport(target)
    start, _ = rss_kb()
    start_file = _rss_file_kb()
    fn = _load_target(target, args.threads)
    loaded, _ = rss_kb()
    loaded_file = _rss_file_kb()
    for _ in range(max(1, args.iters)):
        fn(*inputs)
    _, peak = rss_kb()
    print(json.dumps({"start_kb": start, "loaded_kb": loaded, "peak_kb": peak,
                      "load_file_kb": max(0, loaded_file - start_file)}))
    return 0


def _rss_file_kb() -> int:
    """File-backed resident KiB (``RssFile``: mapped files, e.g. a loaded shared library); 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(_main())
