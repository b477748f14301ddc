"""Validate the memory analysis: predicted vs measured activation peak of an
eager run, for every zoo model (and optionally optimized Programs) at two shapes.

Not a test. Predicted: ``graphopt.transform.memory.analyze_memory(program).at(batch, seq)``,
from shape metadata only. Measured: the torch profiler's memory tracking
(``profile_memory=True``) around one eager call of the Program's GraphModule
after a warm-up call: every allocation and free through PyTorch's CPU
allocator, in order; the peak of live bytes above what was allocated before
the call (weights and inputs are allocated before, so they are not in it,
and neither side counts them). What the profiler cannot see is memory the
libraries allocate themselves (MKL/oneDNN packing, glibc arenas): the
harness's RSS column (``graphopt bench``) shows that as runtime overhead.
Where a row misses the 20% target, the nodes whose in-kernel allocation
differs most from the model are listed (fx Interpreter, one
``record_function`` per node)::

    python benchmarks/bench_memory.py                                  # every zoo model, 2 shapes
    python benchmarks/bench_memory.py --models bert4rec:base,dlrm:base --pipelines none,O2,'O2,cast{dtype=bf16}'
    python benchmarks/bench_memory.py --shapes 1x64,32x128 -o out/memory  # also report.md + report.json

Shapes are ``BATCHxSEQ`` (seq is ignored by models without a dynamic seq dim).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import Any

import torch

import graphopt
from graphopt.bench.memory import allocations_by_node, measure_allocations
from graphopt.bench.timing import machine_info
from graphopt.outputs import atomic_directory
from graphopt.rec.zoo import available_models, load_model
from graphopt.transform.memory import analyze_memory, format_bytes

TARGET = 0.20  # |measured / predicted - 1| the issue asks for


def _shape(text: str) -> tuple[int, int]:
    batch, _, seq = text.partition("x")
    return int(batch), int(seq or 64)


def _explain(program: Any, inputs: tuple[torch.Tensor, ...], analysis: Any, sizes: dict[str, int]) -> list[str]:
    """The nodes whose measured in-kernel allocation differs most from the model's."""
    measured = allocations_by_node(program.gm, inputs)
    modelled = analysis.bytes_by_node(sizes)
    ops = {n.name: str(n.target) for n in program.gm.graph.nodes}
    worst = sorted(set(measured) | set(modelled), key=lambda k: -abs(measured.get(k, 0) - modelled.get(k, 0)))[:3]
    return [f"{k} ({ops.get(k, '?')}): measured {format_bytes(measured.get(k, 0))} inside vs modelled "
            f"{format_bytes(modelled.get(k, 0))}" for k in worst if measured.get(k, 0) != modelled.get(k, 0)]


def validate(name: str, pipeline: str, shapes: list[tuple[int, int]], explain: bool) -> list[dict[str, Any]]:
    zoo = load_model(name)
    program = zoo.capture()
    if pipeline not in ("", "none"):
        data = [program.sample_inputs(seed=1000 + i) for i in range(4)]
        program, _ = graphopt.optimize(program, pipeline, calibration_data=data)
    start = time.perf_counter()
    analysis = analyze_memory(program)
    analysis_s = time.perf_counter() - start
    rows = []
    for batch, seq in shapes:
        estimate = analysis.at(batch=batch, seq=seq)
        inputs = program.sample_inputs(batch=batch, seq=seq if "seq" in analysis.symbols else None, seed=3)
        measured = measure_allocations(program.gm, inputs)
        ratio = measured["peak_bytes"] / max(1, estimate.activations)
        row = {
            "model": name, "pipeline": pipeline or "none", "batch": batch,
            "seq": seq if "seq" in analysis.symbols else None,
            "weight_bytes": estimate.weights, "predicted_bytes": estimate.activations,
            "measured_bytes": measured["peak_bytes"], "ratio": ratio,
            "within_target": abs(ratio - 1) <= TARGET,
            "outputs_predicted": estimate.outputs, "outputs_measured": measured["retained_bytes"],
            "peak_at": estimate.peak_node, "analysis_s": analysis_s, "why": [],
        }
        if explain or not row["within_target"]:
            row["why"] = _explain(program, inputs, analysis, estimate.sizes)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


HEADER = ("| model | pipeline | batch | seq | weights | predicted peak | measured peak | measured/predicted "
          "| outputs pred/meas | peak at |\n|---|---|---|---|---|---|---|---|---|---|")


def _line(r: dict[str, Any]) -> str:
    mark = "" if r["within_target"] else " ✗"
    outputs = "=" if r["outputs_predicted"] == r["outputs_measured"] else f"{r['outputs_predicted']}/{r['outputs_measured']}"
    return (f"| {r['model']} | {r['pipeline']} | {r['batch']} | {r['seq'] or '-'} | {format_bytes(r['weight_bytes'])} "
            f"| {format_bytes(r['predicted_bytes'])} | {format_bytes(r['measured_bytes'])} | {r['ratio']:.3f}{mark} "
            f"| {outputs} | {r['peak_at']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="all", help="comma-separated zoo names (default: every zoo model)")
    parser.add_argument("--pipelines", default="none", help="';'-separated pipelines to validate too ('none' = as captured)")
    parser.add_argument("--shapes", default="1x64,32x128", help="BATCHxSEQ,... (default 1x64,32x128)")
    parser.add_argument("--threads", type=int, help="torch threads (the SDPA scratch model reads this)")
    parser.add_argument("--explain", action="store_true", help="list the most different nodes for every row")
    parser.add_argument("-o", "--output", help="folder for report.md and report.json")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = available_models() if args.models == "all" else args.models.split(",")
    shapes = [_shape(s) for s in args.shapes.split(",")]
    pipelines = [p.strip() for p in args.pipelines.split(";")]
    info = machine_info()
    head = (f"{info['cpu']} · flags {' '.join(info['cpu_flags'])} · torch {info['versions']['torch']} · "
            f"{info['torch_threads']} threads · load {', '.join(f'{x:.1f}' for x in info['load_average'])}")
    print(head)
    print(HEADER)
    rows: list[dict[str, Any]] = []
    for name in models:
        for pipeline in pipelines:
            try:
                rows += validate(name, pipeline, shapes, args.explain)
            except Exception as e:  # noqa: BLE001 - one model's failure is reported, the rest go on
                print(f"| {name} | {pipeline} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |", flush=True)
    misses = [r for r in rows if not r["within_target"]]
    print(f"\n{len(rows) - len(misses)} of {len(rows)} rows within {TARGET:.0%} of the measured peak")
    for r in rows:
        for why in r["why"]:
            print(f"- {r['model']} {r['pipeline']} b{r['batch']}: {why}")
    if args.output:
        with atomic_directory(args.output, force=args.force) as tmp:
            (tmp / "report.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1, default=str))
            (tmp / "report.md").write_text("\n".join([head, "", HEADER, *map(_line, rows), ""]))
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
