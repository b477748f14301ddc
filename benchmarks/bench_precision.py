"""Precision benchmark: accuracy per calibration method, and fp32 vs bf16 vs int8
latency on eager, ONNX Runtime and Inductor at batch 1 and 32, in one run.

    /work/venv/bin/python benchmarks/bench_precision.py [--models bert4rec:base,dlrm:base]
        [--rounds 7] [--iters 20] [--skip-inductor] [--json out.json]

Accuracy: top-10 overlap and cosine of the first output vs eager fp32 on a held-out
batch of 256 (dlrm: ranks the batch's 256 candidates). Latency: per (runtime, batch)
the variants run interleaved, ``rounds`` rounds of ``iters`` calls after warm-up;
the median per call is reported with the ratio to fp32 on the same runtime. ONNX
Runtime gets no bf16 variant: its CPU provider has no bf16 kernels.
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
from graphopt.runtimes.onnx_export import ORT_DISABLED_OPTIMIZERS, qdq_translations

import graphopt
from graphopt.passlib.calibration import agreement
from graphopt.rec.zoo import load_model


def _calibration(zm, n=8, batch=32):
    return [tuple(zm.make_inputs(batch=batch, seed=s).values()) for s in range(100, 100 + n)]


def accuracy(name, program, zm, methods):
    held = tuple(zm.make_inputs(batch=256, seed=7).values())
    ref = program(*held)
    rows = []
    calib = _calibration(zm)
    variants = [("bf16", "cast", None), ("int8-dynamic", "quantize-int8-dynamic", None)]
    variants += [(f"int8-{m}", f"quantize-int8{{calibration={m}}}", calib) for m in methods]
    for label, pipe, data in variants:
        t = time.perf_counter()
        out, _ = graphopt.optimize(program, pipe, calibration_data=data, verify_each=False)
        secs = time.perf_counter() - t
        res = [o.float() for o in out(*held)]
        rows.append({"model": name, "variant": label, "top10_overlap": agreement("topk_overlap", res, ref),
                     "cosine": agreement("cosine", res, ref), "optimize_s": secs})
        print(f"  {name:14s} {label:18s} top10 {rows[-1]['top10_overlap']:.4f}  cosine {rows[-1]['cosine']:.6f}"
              f"  ({secs:.1f}s)", flush=True)
    return rows


def _ort_session(program, tmp):
    import onnxruntime as ort

    path = Path(tmp) / f"{program.name.replace(':', '_')}_{len(os.listdir(tmp))}.onnx"
    onx = torch.onnx.export(program.export(), dynamo=True, custom_translation_table=qdq_translations(),
                            verbose=False)
    onx.save(str(path))
    from graphopt.runtimes.onnxruntime import session_options

    opts = session_options(intra_op_threads=torch.get_num_threads(), spin=False)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS))
    names = [i.name for i in sess.get_inputs()]
    return lambda *x: sess.run(None, {n: a.numpy() for n, a in zip(names, x)})


def _inductor(program):
    from torch._inductor import config

    config.freezing = True
    compiled = torch.compile(program.gm, dynamic=False)

    def run(*x):
        with torch.no_grad():
            return compiled(*x)

    return run


def latency(name, programs, runtimes, batches, rounds, iters, tmp):
    rows = []
    for rt in runtimes:
        fns = {}
        for label, prog in programs.items():
            if rt == "onnxruntime" and label == "bf16":
                continue
            fns[label] = {"eager": lambda p=prog: p, "onnxruntime": lambda p=prog: _ort_session(p, tmp),
                          "inductor": lambda p=prog: _inductor(p)}[rt]()
        for batch in batches:
            x = tuple(programs["fp32"].sample_inputs(batch=batch, seed=1))
            times = {k: [] for k in fns}
            for fn in fns.values():
                for _ in range(3):
                    fn(*x)  # warm-up (and Inductor's compile for this shape)
            for _ in range(rounds):
                for label, fn in fns.items():  # interleaved
                    t = time.perf_counter()
                    for _ in range(iters):
                        fn(*x)
                    times[label].append((time.perf_counter() - t) / iters)
            base = statistics.median(times["fp32"])
            for label, ts in times.items():
                med = statistics.median(ts)
                rows.append({"model": name, "runtime": rt, "batch": batch, "variant": label,
                             "median_ms": med * 1e3, "p90_ms": sorted(ts)[int(0.9 * (len(ts) - 1))] * 1e3,
                             "speedup_vs_fp32": base / med})
                print(f"  {name:14s} {rt:11s} b={batch:<3d} {label:5s} {med * 1e3:9.3f} ms  x{base / med:.2f}",
                      flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert4rec:base,dlrm:base")
    ap.add_argument("--methods", default="minmax,percentile,entropy,mse")
    ap.add_argument("--runtimes", default="eager,onnxruntime,inductor")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu {os.cpu_count()} cores "
          "(shared machine: other jobs may add noise; compare ratios, not absolute times)", flush=True)
    result = {"accuracy": [], "latency": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            zm = load_model(name)
            program = zm.capture()
            print(f"accuracy vs eager fp32 ({name})", flush=True)
            result["accuracy"] += accuracy(name, program, zm, args.methods.split(","))
            int8, _ = graphopt.optimize(program, "quantize-int8", calibration_data=_calibration(zm),
                                        verify_each=False)
            bf16, _ = graphopt.optimize(program, "cast", verify_each=False)
            programs = {"fp32": program, "bf16": bf16, "int8": int8}
            print(f"latency ({name})", flush=True)
            result["latency"] += latency(name, programs, args.runtimes.split(","),
                                         [int(b) for b in args.batches.split(",")], args.rounds, args.iters, tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
