"""The incremental step's GEMMs on Inductor: oneDNN's packed weights vs MKL on plain weights.

    .venv/bin/python benchmarks/bench_step_kernels.py [--model gpt-rec:base] [--history 64]
        [--batches 1,8,32] [--pipeline O2] [--threads 2] [--rounds 9] [--json FILE]

The step entry of one causal model (``derive_incremental(program, history)``) is lowered
twice with ``graphopt.lower``, ``weight_prepack=True`` (Inductor's default for a frozen
graph: every linear a oneDNN packed GEMM) and ``weight_prepack=False`` (``addmm`` on the
plain weights: MKL; what ``lower_incremental`` picks for a float32 step), and the two
packages are timed interleaved in the same rounds per batch (one new event per user on a
full window). ``speedup`` is packed / plain (median over rounds, paired); both outputs are
checked against the eager step (``max_abs``). Absolute milliseconds depend on the machine's
load (recorded); compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

import graphopt
from graphopt.bench.timing import TimingConfig, finish_report, paired_speedup, run_interleaved, summarize
from graphopt.passlib.incremental import derive_incremental
from graphopt.rec.zoo import load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt-rec:base")
    ap.add_argument("--history", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--pipeline", default="O2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg())
    zm = load_model(args.model)
    program, _ = graphopt.optimize(zm.capture(), args.pipeline, verify_each=False)
    inc = derive_incremental(program, args.history)
    items = int(zm.config["items"])
    root = Path(tempfile.mkdtemp(prefix="bench-step-kernels-"))
    runners, compile_s = {}, {}
    for prepack in (True, False):
        name = "packed" if prepack else "plain"
        t0 = time.perf_counter()
        graphopt.lower(inc.step, "inductor", root / name, weight_prepack=prepack)
        compile_s[name] = time.perf_counter() - t0
        print(f"lowered {name} in {compile_s[name]:.1f}s", flush=True)
        runners[name] = graphopt.load(root / name).activate()
    config = TimingConfig(warmup=3, rounds=args.rounds, round_time_s=0.2, max_calls=20)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(1, items + 1, (batch, args.history), generator=gen)
        new = torch.randint(1, items + 1, (batch, 1), generator=gen)
        state = inc.prefill(ids, torch.ones_like(ids))[len(inc.scores):]
        want = inc.step(new, *state)[0]
        fns = {name: (lambda r=r, x=new, s=state: r(x, *s)) for name, r in runners.items()}
        samples = run_interleaved(fns, config)
        ratio = paired_speedup(samples["packed"], samples["plain"])
        row = {"batch": batch, "history": args.history, "speedup": ratio["speedup"],
               "speedup_p10": ratio["speedup_p10"], "speedup_p90": ratio["speedup_p90"]}
        for name, r in runners.items():
            row[f"{name}_ms"] = summarize(samples[name], batch)["p50_ms"]
            row[f"{name}_max_abs"] = float((r(new, *state)[0] - want).abs().max())
        rows.append(row)
        print(f"{args.model} {args.pipeline} history {args.history} batch {batch:3d}: packed {row['packed_ms']:8.3f} ms"
              f"  plain {row['plain_ms']:8.3f} ms  plain is {row['speedup']:.2f}x packed  max_abs "
              f"{max(row['packed_max_abs'], row['plain_max_abs']):.1e}", flush=True)
    for r in runners.values():
        r.close()
    report = {"model": args.model, "pipeline": args.pipeline, "threads": args.threads, "rows": rows,
              "lower_seconds": compile_s}
    finish_report(report, load_start, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
