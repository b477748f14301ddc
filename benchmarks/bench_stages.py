"""Benchmark: the stages runtime (torch.distributed, gloo on 127.0.0.1) on bert4rec.

Two measurements, both through the ``stages`` runtime's own runners:

* Memory: the model lowered as 1 stage (the whole model) and as 2 stages
  (``split-stages{n=2}``); each is run by ``graphopt serve-stages`` in fresh processes (rank 0 plus
  the ranks it spawns), which report per rank the RSS at start, after
  loading its stage, and the peak. "model MB" is loaded - start (weights and
  graph), "peak MB" is peak - start (weights + activations + comm buffers).
* Throughput: 1 stage vs 2 stages with 1/4/8 micro-batches, in one process
  (rank 0 of the 2-stage runner and the 1-stage runner side by side), calls
  interleaved round by round; medians, p90, and speedups vs 1 stage / 1
  micro-batch computed per round. Each rank uses ``--threads`` torch threads
  (default 1), so 2 stages use twice the cores of 1 stage (changing the
  thread count between interleaved calls costs more than it measures, so
  the whole model on 2 threads is left to ``graphopt serve-stages``).

    python benchmarks/bench_stages.py                    # bert4rec:base, batch 32, seq 64
    python benchmarks/bench_stages.py --model bert4rec:tiny --rounds 3 --json out.json

Not a test: nothing is asserted. On a shared or small machine the absolute
numbers are noisy; the interleaved ratios are the ones to read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from graphopt.runtimes.stages import load_stages, lower_stages

import graphopt
from graphopt.bench.timing import (
    TimingConfig,
    load_warning,
    machine_info,
    paired_speedup,
    run_interleaved,
    summarize,
)
from graphopt.rec.zoo import load_model


def _memory(artifact: Path, batch: int, seq: int, threads: int) -> list[dict[str, Any]]:
    cmd = [
        sys.executable,
        "-m",
        "graphopt",
        "serve-stages",
        str(artifact),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--iterations",
        "3",
        "--threads",
        str(threads),
        "--check",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"serve-stages failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    for r in summary["ranks"]:
        rows.append(
            {
                "rank": r["rank"],
                "parameter_mb": round(r["parameter_bytes"] / 2**20, 2),
                "model_mb": round(r["rss_loaded_mb"] - r["rss_start_mb"], 1),
                "peak_mb": round(r["rss_peak_mb"] - r["rss_start_mb"], 1),
                "rss_peak_mb": r["rss_peak_mb"],
            }
        )
    return [{"max_abs_error": summary.get("max_abs_error")}, *rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert4rec:base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--balance", default="flops", choices=("params", "flops", "memory"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    program = load_model(args.model).capture()
    out: dict[str, Any] = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "threads_per_rank": args.threads,
        "machine": machine_info(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        split, _ = graphopt.optimize(program, f"split-stages{{n=2 balance={args.balance}}}", verify_each=False)
        one = lower_stages(program, Path(tmp) / "one", stages=1)
        two = lower_stages(split, Path(tmp) / "two")
        out["cut"] = two.backend["cuts"]
        print(f"{args.model}: 2 stages cut after {two.backend['cuts']} (balance={args.balance})")

        out["memory"] = {
            "1 stage": _memory(one.path, args.batch, args.seq, args.threads),
            "2 stages": _memory(two.path, args.batch, args.seq, args.threads),
        }
        print("\nmemory per rank (MB; model = after load - at start, peak = peak - at start)")
        for name, rows in out["memory"].items():
            for r in rows[1:]:
                print(
                    f"  {name:<9} rank {r['rank']}: params {r['parameter_mb']:7.2f}  model {r['model_mb']:7.1f}"
                    f"  peak {r['peak_mb']:7.1f}  (process peak RSS {r['rss_peak_mb']:.0f})"
                )
            print(f"  {name:<9} max |distributed - stages in sequence| = {rows[0]['max_abs_error']}")

        torch.set_num_threads(args.threads)
        gen = torch.Generator().manual_seed(0)
        inputs = [s.sample({"batch": args.batch, "seq": args.seq}, gen) for s in program.inputs]
        reference = program(*inputs)
        single = load_stages(one.path)
        staged = load_stages(two.path, threads=args.threads, timeout=300)
        with single, staged:

            def call(runner: Any, micro: int) -> Any:
                def fn() -> Any:
                    runner.microbatches = micro
                    return runner(*inputs)

                return fn

            variants = {f"1 stage, {m} mb": call(single, m) for m in (1, 4, 8)}
            variants.update({f"2 stages, {m} mb": call(staged, m) for m in (1, 4, 8)})
            errors = {
                name: max((o - r).abs().max().item() for o, r in zip(fn(), reference))
                for name, fn in variants.items()
            }
            config = TimingConfig(warmup=3, rounds=args.rounds, round_time_s=0.5, max_calls=5)
            samples = run_interleaved(variants, config)
            ranks = staged.stats()
        base = samples["1 stage, 1 mb"]
        out["throughput"] = {}
        print(
            f"\nthroughput, batch {args.batch} x seq {args.seq}, {args.threads} thread(s) per rank, "
            f"{args.rounds} interleaved rounds"
        )
        for name, s in samples.items():
            row = {**summarize(s, args.batch), **paired_speedup(base, s), "max_abs_error": errors[name]}
            out["throughput"][name] = row
            print(
                f"  {name:<26} p50 {row['p50_ms']:8.1f} ms  p90 {row['p90_ms']:8.1f} ms  "
                f"{row['throughput']:7.1f} samples/s  speedup {row['speedup']:.2f}x "
                f"[{row['speedup_p10']:.2f}-{row['speedup_p90']:.2f}]  max err {row['max_abs_error']:.1e}"
            )
        out["ranks_after_timing"] = ranks
    warning = load_warning()
    if warning:
        print(f"\nnote: {warning}")
        out["warning"] = warning
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
