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

from graphopt.process import reset_peak_rss, rss_kb

__all__ = ["measure_in_process", "measure_subprocess"]

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
    }


# ---------------------------------------------------------------- subprocess side
def _load_target(target: dict[str, Any], threads: int | None) -> Callable[..., Any]:
    kind = target["kind"]
    if kind == "artifact":
        from graphopt.bench.variants import runner_options
        from graphopt.runtime import load, read_artifact

        runtime = read_artifact(target["path"], verify=False).runtime
        return load(target["path"], **runner_options(runtime, threads)).activate()
    if kind == "onnx":
        from graphopt.bench.peers import ort_session

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
    fn = _load_target(target, args.threads)
    loaded, _ = rss_kb()
    for _ in range(max(1, args.iters)):
        fn(*inputs)
    _, peak = rss_kb()
    print(json.dumps({"start_kb": start, "loaded_kb": loaded, "peak_kb": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
