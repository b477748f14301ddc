"""Latency of every available runtime vs eager on one model, measured in one run.

    python benchmarks/bench_runtimes.py --model bert4rec:base --batches 1,32

Lowers the (optionally optimized) Program with each runtime into a temp
folder, checks each against eager once per batch size, then times them in
interleaved rounds (runtime order rotated each round, device synchronized
around each timed block) and reports per runtime the median per-call
latency and its ratio to eager (< 1 is faster). Timings are noisy on shared
machines: compare ratios from the same run only.
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


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert4rec:base")
    p.add_argument("--pipeline", default="", help="optimize first, e.g. O2")
    p.add_argument("--runtimes", default="", help="comma list (default: every available runtime)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's example)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per runtime per round")
    p.add_argument("--threads", type=int, default=0, help="torch/ORT intra-op threads (0 = default)")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    return p.parse_args()


def _timed(runner, feeds, n: int) -> float:
    runner.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        runner(*feeds)
    runner.synchronize()
    return (time.perf_counter() - start) / n


def main() -> int:
    args = _parse()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("GRAPHOPT_VERIFY_EACH", "0")
    from graphopt.runtimes.eager import EagerRunner

    import graphopt
    from graphopt.rec.zoo import load_model
    from graphopt.runtime import available_runtimes, load, lower

    if args.threads:
        torch.set_num_threads(args.threads)
    program = load_model(args.model).capture()
    if args.pipeline:
        program, _ = graphopt.optimize(program, args.pipeline, verify_each=False)
    status = available_runtimes()
    names = [n for n in (args.runtimes.split(",") if args.runtimes else status) if n != "eager"]
    skipped = {n: status[n].reason for n in names if not status[n].available}
    names = [n for n in names if status[n].available]
    runners = {"eager": EagerRunner.from_program(program).activate()}
    lowering: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            start = time.perf_counter()
            opts = {"device": "auto"} if name in ("torchscript", "inductor") else {}
            art = lower(program, name, f"{tmp}/{name}", **opts)
            lowering[name] = time.perf_counter() - start
            load_opts = {"intra_op_threads": args.threads} if name == "onnxruntime" and args.threads else {}
            runners[name] = load(art.path, **load_opts).activate()
            print(f"lowered {name} in {lowering[name]:.1f}s", file=sys.stderr)
        results: dict = {"model": args.model, "pipeline": program.pipeline, "torch_threads": torch.get_num_threads(),
                         "lowering_s": {k: round(v, 1) for k, v in lowering.items()}, "skipped": skipped,
                         "batches": {}}
        for batch in (int(b) for b in args.batches.split(",")):
            feeds = program.sample_inputs(batch=batch, seq=args.seq, seed=0)
            ref = program(*feeds)
            errors, iters = {}, {}
            for name, runner in runners.items():
                for _ in range(3):  # warm-up (TorchScript profiles its first runs)
                    out = runner(*feeds)
                errors[name] = max((o.cpu().float() - r.float()).abs().max().item() for o, r in zip(out, ref))
                per_call = _timed(runner, feeds, 2)
                iters[name] = max(1, int(args.min_time / max(per_call, 1e-6)))
            samples: dict[str, list[float]] = {n: [] for n in runners}
            order = list(runners)
            for r in range(args.rounds):
                rotated = order[r % len(order):] + order[: r % len(order)]
                for name in rotated:
                    samples[name].append(_timed(runners[name], feeds, iters[name]))
            med = {n: statistics.median(s) for n, s in samples.items()}
            results["batches"][batch] = {
                n: {"median_ms": round(med[n] * 1e3, 3), "ratio_vs_eager": round(med[n] / med["eager"], 3),
                    "max_abs_err": float(f"{errors[n]:.3g}"), "device": runners[n].device}
                for n in runners
            }
            print(f"\n{args.model} batch {batch} seq {feeds[0].shape[-1] if feeds[0].dim() > 1 else '-'} "
                  f"({args.rounds} interleaved rounds, medians)")
            print(f"  {'runtime':<12} {'median ms':>10} {'vs eager':>9} {'max|err|':>9}")
            for n, row in results["batches"][batch].items():
                print(f"  {n:<12} {row['median_ms']:>10.3f} {row['ratio_vs_eager']:>8.3f}x {row['max_abs_err']:>9.2g}")
        for runner in runners.values():
            runner.deactivate()
    for n, why in skipped.items():
        print(f"  skipped {n}: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
