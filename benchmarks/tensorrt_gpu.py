"""End-to-end GPU check: TensorRT (and the CUDA paths of eager/TorchScript/Inductor).

Run on a machine with an NVIDIA GPU::

    pip install -e '.[onnx]' tensorrt          # tensorrt from NVIDIA's index where PyPI lacks it
    python benchmarks/tensorrt_gpu.py --model bert4rec:base --batches 1,32

Steps: static check of the exported ONNX (``graphopt check-tensorrt``), lower
to a TensorRT engine (fp32, and fp16 with ``--fp16``), load, compare to eager
on CUDA, then time TensorRT, eager, TorchScript and Inductor on CUDA in
interleaved rounds (medians, ``torch.cuda.synchronize`` around each block).
Without TensorRT it still runs the CUDA paths and says why TensorRT was
skipped; without CUDA it exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch


def _timed(runner, feeds, n: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        runner(*feeds)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert4rec:base")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--fp16", action="store_true", help="also build an fp16 TensorRT engine")
    p.add_argument("--runtimes", default="eager,torchscript,inductor,tensorrt")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("GRAPHOPT_VERIFY_EACH", "0")
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    from graphopt.runtimes.onnx_export import export_onnx
    from graphopt.runtimes.tensorrt_check import check_onnx

    from graphopt.process import quiet_backends
    from graphopt.rec.zoo import load_model
    from graphopt.runtime import available_runtimes, load, lower

    program = load_model(args.model).capture()
    with quiet_backends():
        findings = check_onnx(export_onnx(program))
    errors = [str(f) for f in findings if f.severity == "error"]
    print(f"check-tensorrt {args.model}: {len(errors)} errors", *errors[:5], sep="\n  ")
    status = available_runtimes()
    wanted = args.runtimes.split(",")
    results: dict = {"model": args.model, "gpu": torch.cuda.get_device_name(), "check_errors": errors,
                     "skipped": {n: status[n].reason for n in wanted if not status[n].available}, "batches": {}}
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = [(n, {}) for n in wanted if status[n].available]
        if args.fp16 and status["tensorrt"].available:
            variants.append(("tensorrt", {"fp16": True}))
        for name, opts in variants:
            label = name + ("-fp16" if opts.get("fp16") else "")
            if name in ("eager", "torchscript", "inductor"):
                opts = {**opts, "device": "cuda"}
            start = time.perf_counter()
            art = lower(program, name, f"{tmp}/{label}", **opts)
            print(f"lowered {label} in {time.perf_counter() - start:.1f}s", flush=True)
            runners[label] = load(art.path).activate()
        for batch in (int(b) for b in args.batches.split(",")):
            feeds = program.sample_inputs(batch=batch, seed=0)
            ref = program(*feeds)
            rows = {}
            for label, r in runners.items():
                for _ in range(3):
                    out = r(*feeds)
                err = max((o.float().cpu() - e.float()).abs().max().item() for o, e in zip(out, ref))
                rows[label] = {"max_abs_err": err, "samples": []}
            order = list(runners)
            for i in range(args.rounds):
                for label in order[i % len(order):] + order[: i % len(order)]:
                    rows[label]["samples"].append(_timed(runners[label], feeds, args.iters))
            eager = statistics.median(rows["eager"]["samples"]) if "eager" in rows else None
            print(f"\n{args.model} batch {batch} on {results['gpu']}")
            for label, row in rows.items():
                med = statistics.median(row.pop("samples"))
                row["median_ms"] = med * 1e3
                row["ratio_vs_eager"] = med / eager if eager else None
                ratio = f"{row['ratio_vs_eager']:.3f}x" if eager else "-"
                print(f"  {label:<16} {row['median_ms']:9.3f} ms  {ratio:>8}  max|err| {row['max_abs_err']:.2g}")
            results["batches"][batch] = rows
        for r in runners.values():
            r.deactivate()
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
