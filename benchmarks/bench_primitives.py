"""Where the time goes inside graphopt's Inductor packages: oneDNN's GEMMs by shape, per pipeline.

    python benchmarks/bench_primitives.py --model bert-cls:base [--batch 32] [--seq 64] [--threads 2]
        [--pipelines "bf16=O2,cast{dtype=bf16}" "int8-bf16=O2,quantize-int8{mixed=bf16}"] [--json FILE]

Each pipeline is optimized (int8 calibrated on the bench's own 16 batches of 32 rows,
``graphopt.bench.calibration``, the accuracy guard on, so the plan is the one ``graphopt bench``
times), lowered to AOTInductor and
loaded with ``graphopt.load``; the untraced median of ``--calls`` calls gives the
wall time, then ``--traced`` calls run with oneDNN's verbose output on
(``graphopt.bench.primitives``): every GEMM primitive with its problem shape,
source -> destination dtypes, fused post-ops and oneDNN's own time, the attention's
brgemm micro-kernels summed, per call (the traced calls' mean), and what is left (Inductor's own kernels,
among them any GEMM max-autotune gave to Inductor's CPP GEMM template, which oneDNN does not trace, and the
wrapper). Rows of the pipelines that share a GEMM shape (rows, reduction, columns)
are printed side by side with their time ratio. Prints the CPU model and flags and
the load average; verbose tracing slows the traced call, so shares are estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import graphopt
from graphopt.bench.calibration import bench_calibration
from graphopt.bench.primitives import onednn_trace, summarize
from graphopt.hardware import cpu_model, reported_flags


def _profile(model: str, name: str, pipeline: str, batch: int, seq: int, calls: int, traced: int) -> dict:
    from graphopt.rec.zoo import load_model

    zm = load_model(model)
    program = zm.capture()
    # the bench's own calibration batches (16 x 32 rows): fewer gave bert4rec:base's int8-bf16 another plan
    # (8 batches: its FFN up-projections int8; the bench's 16: bf16), so the profile described another model
    calibration, _ = bench_calibration(
        lambda b, s, seed: tuple(zm.make_inputs(batch=b, seq=s, seed=seed)[n] for n in program.input_names),
        [(batch, seq)])
    optimized, _ = graphopt.optimize(program, pipeline, calibration_data=calibration, verify_each=False)
    inputs = [zm.make_inputs(batch=batch, seq=seq, seed=7)[n] for n in program.input_names]
    with tempfile.TemporaryDirectory() as tmp:
        graphopt.lower(optimized, "inductor", Path(tmp) / "aoti", device="cpu")
        runner = graphopt.load(Path(tmp) / "aoti")
        with runner:
            for _ in range(3):
                runner(*inputs)
            wall = []
            for _ in range(calls):
                t = time.perf_counter()
                runner(*inputs)
                wall.append((time.perf_counter() - t) * 1e3)
            with onednn_trace() as trace:
                for _ in range(traced):
                    runner(*inputs)
    rows = summarize(trace.records())  # totals over the traced calls; reported per call
    return {"name": name, "pipeline": pipeline, "wall_ms": statistics.median(wall),
            "rows": [{"kind": r.kind, "mkn": r.mkn, "problem": r.problem, "dtypes": r.dtypes, "post_ops": r.post_ops,
                      "calls": r.calls / traced, "ms": r.ms / traced} for r in rows]}


def _print(result: dict) -> None:
    rows = result["rows"]
    gemm = sum(r["ms"] for r in rows if r["kind"] in ("inner_product", "matmul"))
    attention = sum(r["ms"] for r in rows if r["kind"] == "brgemm")
    other = sum(r["ms"] for r in rows if r["kind"] not in ("inner_product", "matmul", "brgemm"))
    wall = result["wall_ms"]
    print(f"\n## {result['name']} = {result['pipeline']}: {wall:.2f} ms per call (untraced median)")
    print(f"oneDNN GEMMs {gemm:.2f} ms, attention micro-kernels {attention:.2f} ms, other primitives {other:.2f} ms;"
          f" the rest (Inductor kernels, wrapper) ~{max(0.0, wall - gemm - attention - other):.2f} ms")
    print("| kind | rows x red. x cols | dtypes | post-ops | calls | ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "brgemm" or r["ms"] < 0.005 * wall:
            continue
        mkn = "x".join(map(str, r["mkn"])) if r["mkn"] else r["problem"]
        print(f"| {r['kind']} | {mkn} | {r['dtypes']} | {r['post_ops'] or '-'} | {r['calls']:g} | {r['ms']:.3f} |")


def _side_by_side(results: list[dict]) -> None:
    if len(results) < 2:
        return
    per = []
    for res in results:
        shapes: dict[tuple, float] = {}
        for r in res["rows"]:
            if r["kind"] in ("inner_product", "matmul") and r["mkn"]:
                shapes[tuple(r["mkn"])] = shapes.get(tuple(r["mkn"]), 0.0) + r["ms"]
        per.append(shapes)
    common = sorted(set.intersection(*(set(p) for p in per)), key=lambda k: -per[0][k])
    names = [r["name"] for r in results]
    print(f"\n## GEMM time by shape (ms per call), {' vs '.join(names)}")
    print("| rows x red. x cols | " + " | ".join(names) + f" | {names[0]} / {names[-1]} |")
    print("|---|" + "---|" * (len(names) + 1))
    for k in common:
        print(f"| {'x'.join(map(str, k))} | " + " | ".join(f"{p[k]:.3f}" for p in per) + f" | {per[0][k] / per[-1][k]:.2f}x |")
    totals = [sum(p[k] for k in common) for p in per]
    print("| all shared shapes | " + " | ".join(f"{t:.3f}" for t in totals) + f" | {totals[0] / totals[-1]:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-cls:base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20, help="untraced calls timed (median)")
    ap.add_argument("--traced", type=int, default=5, help="calls traced (primitive times are their mean)")
    ap.add_argument("--pipelines", nargs="+",
                    default=["bf16=O2,cast{dtype=bf16}", "int8-bf16=O2,quantize-int8{mixed=bf16}"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} flags: {' '.join(reported_flags())}; torch {torch.__version__}; "
          f"{args.threads} threads; load before: {os.getloadavg()}")
    print(f"{args.model}, batch {args.batch}, seq {args.seq}")
    results = []
    for spec in args.pipelines:
        name, _, pipeline = spec.partition("=")
        results.append(_profile(args.model, name, pipeline or name, args.batch, args.seq, args.calls,
                                args.traced))
        _print(results[-1])
    _side_by_side(results)
    print(f"\nload after: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "batch": args.batch, "seq": args.seq,
                                               "cpu": cpu_model(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
