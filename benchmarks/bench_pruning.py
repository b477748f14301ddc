"""Benchmark: structured pruning of bert4rec (heads + FFN) at 30% and 50%.

For each variant (unpruned, 30%, 50%): parameters, FLOPs, latency on eager
and on ONNX Runtime, and the top-10 overlap of its scores with the unpruned
model's on held-out inputs. Latencies are measured in one run, rounds
interleaved across variants, and reported as medians (p90 too) and as ratios
to the unpruned model on the same backend. Not a test: nothing is asserted.

    python benchmarks/bench_pruning.py                       # bert4rec:base, batch 8, seq 64
    python benchmarks/bench_pruning.py --model bert4rec:tiny --rounds 5 --json out.json

Optional recovery (``--recover-steps N``): distill each pruned model towards
the unpruned one with :func:`graphopt.pruning.recover` on random inputs
before measuring the overlap (a random-weight zoo model has no real data; use
``graphopt finetune`` checkpoints for meaningful numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

import graphopt
from graphopt.metrics import topk_overlap
from graphopt.passlib.pruning import recover
from graphopt.rec.zoo import load_model
from graphopt.runtime import load, lower
from graphopt.transform.analysis import count_flops

VARIANTS = {
    "unpruned": "",
    "heads+ffn 30%": "prune-heads{ratio=0.3},prune-ffn{ratio=0.3}",
    "heads+ffn 50%": "prune-heads{ratio=0.5},prune-ffn{ratio=0.5}",
}


def _time(fn: Any, inputs: tuple[torch.Tensor, ...], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*inputs)
        out.append(time.perf_counter() - start)
    return out


def _p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert4rec:base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per variant per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the top-10 overlap")
    ap.add_argument("--recover-steps", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    zoo = load_model(args.model)
    base = zoo.capture()
    x = base.sample_inputs(batch=args.batch, seq=args.seq, seed=123)
    evals = [base.sample_inputs(batch=args.batch, seq=args.seq, seed=1000 + i) for i in range(args.eval_batches)]
    refs = [base(*e)[0] for e in evals]

    programs: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, pipeline in VARIANTS.items():
        prog = graphopt.optimize(base, pipeline, verify_each=False)[0] if pipeline else base
        if pipeline and args.recover_steps:
            train = [base.sample_inputs(batch=args.batch, seq=args.seq, seed=50 + i) for i in range(4)]
            rows.setdefault(name, {})["recover"] = recover(prog, base, train, steps=args.recover_steps, lr=1e-4)
        programs[name] = prog
        rows.setdefault(name, {}).update(
            pipeline=pipeline or "(none)",
            params=prog.num_parameters(),
            flops=count_flops(prog, x),
            top10_overlap=statistics.mean(topk_overlap(prog(*e)[0], r, 10) for e, r in zip(evals, refs)),
        )

    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for name, prog in programs.items():
            lower(prog, "onnxruntime", os.path.join(tmp, name.replace(" ", "_").replace("%", "")))
            runners[name] = load(os.path.join(tmp, name.replace(" ", "_").replace("%", ""))).activate()
        backends = {
            "eager": {n: p for n, p in programs.items()},
            "onnxruntime": runners,
        }
        times: dict[tuple[str, str], list[float]] = {}
        # one backend at a time (a thread pool keeps spinning after a call and would
        # slow the other backend's pool), variants interleaved within each backend
        for backend, fns in backends.items():
            for fn in fns.values():
                _time(fn, x, args.warmup)
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times.setdefault((backend, name), []).extend(_time(fn, x, args.reps))
        for r in runners.values():
            r.deactivate()

    report: dict[str, Any] = {
        "model": args.model, "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "reps": args.reps,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "variants": rows,
    }
    print(f"{args.model} batch={args.batch} seq={args.seq} torch {torch.__version__} threads={torch.get_num_threads()} "
          f"rounds={args.rounds}x{args.reps} (interleaved, medians)")
    print(f"{'variant':<15} {'params':>11} {'GFLOPs':>8} {'top10':>6}  "
          f"{'eager ms':>9} {'ratio':>6} {'p90':>7}  {'ORT ms':>8} {'ratio':>6} {'p90':>7}")
    for name, row in rows.items():
        cells = []
        for backend in backends:
            t = times[(backend, name)]
            med, base_med = statistics.median(t), statistics.median(times[(backend, "unpruned")])
            row[backend] = {"median_ms": med * 1e3, "p90_ms": _p(t, 0.9) * 1e3, "ratio_vs_unpruned": med / base_med}
            cells.append(f"{med * 1e3:9.2f} {med / base_med:6.2f} {_p(t, 0.9) * 1e3:7.2f}")
        print(f"{name:<15} {row['params']:>11,} {row['flops'] / 1e9:8.3f} {row['top10_overlap']:6.3f}  "
              + "  ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
