"""Inductor's float32 packages by rows per call: oneDNN's packed weights, MKL's GEMM on the plain
weights, and the artifact that holds both (``split_rows``).

    .venv/bin/python benchmarks/bench_split_rows.py [--models bert4rec:base,t5-rec:base]
        [--batches 1,2,4,8,32] [--seq 64] [--pipeline O2] [--split-rows 512] [--threads 2]
        [--rounds 7] [--prefill] [--json FILE]

Each model's ``--pipeline`` Program is lowered once with ``graphopt.lower(..., max_autotune=True,
split_rows=N)``: ``model.pt2`` (packed weights, autotuned) and ``model_rows.pt2`` (plain weights,
autotuned, compiled in a fresh interpreter). Per batch (at ``--seq`` history), interleaved in the
same rounds: eager (the captured module), ``packed`` and ``plain`` (each package loaded alone with
``torch._inductor.aoti_load_package``) and ``split`` (the artifact's runner, which picks one per
call: plain from N rows, batch x history). ``plain_vs_packed`` = packed / plain (paired medians
over rounds; > 1: the plain weights are faster), ``split_vs_eager`` likewise. Every output is
checked against the Program (``max_abs``). On an AMD EPYC (AVX2) the crossing of
``plain_vs_packed`` over 1 is what ``InductorBackend``'s ``SPLIT_ROWS`` default comes from.

``--prefill`` (causal models: gpt-rec) times the incremental ``prefill`` entry instead, derived with
``max_history=--seq`` and lowered unautotuned as ``graphopt.lower_incremental`` lowers it, over
``--seq`` + 1 events per user (a full recompute); there is no eager module to time, ``eager_ms`` is the
derived Program run by PyTorch.
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
from graphopt.rec.zoo import load_model


def bench_model(name: str, args: argparse.Namespace, root: Path) -> list[dict]:
    zm = load_model(name)
    program, _ = graphopt.optimize(zm.capture(), args.pipeline, verify_each=False)
    events, module = args.seq, zm.module
    if args.prefill:
        from graphopt.passlib.incremental import derive_incremental

        program = module = derive_incremental(program, args.seq).prefill
        events = args.seq + 1
    t0 = time.perf_counter()
    artifact = graphopt.lower(program, "inductor", root / name.replace(":", "_"), device="cpu",
                              max_autotune=not args.prefill, split_rows=args.split_rows)
    print(f"{name}: lowered both packages in {time.perf_counter() - t0:.0f}s", flush=True)
    backend = artifact.manifest["backend"]
    alone = {"packed": torch._inductor.aoti_load_package(str(artifact.path / backend["entry"])),
             "plain": torch._inductor.aoti_load_package(str(artifact.path / backend["split"]["entry"]))}
    runner = graphopt.load(artifact.path).activate()
    config = TimingConfig(warmup=2, rounds=args.rounds, round_time_s=0.3, max_calls=20)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = tuple(zm.make_inputs(batch=batch, seq=events, seed=batch).values())
        want = program(*inputs)[0]
        fns = {"eager": lambda x=inputs: module(*x), "split": lambda x=inputs: runner(*x),
               **{n: (lambda m=m, x=inputs: m(*x)) for n, m in alone.items()}}
        with torch.inference_mode():
            samples = run_interleaved(fns, config)
            max_abs = max(float((fn()[0] - want).abs().max()) for n, fn in fns.items() if n != "eager")
        row = {"model": name, "entry": "prefill" if args.prefill else "model", "batch": batch, "history": events,
               "rows": batch * events,
               **{f"{n}_ms": summarize(s, batch)["p50_ms"] for n, s in samples.items()},
               "plain_vs_packed": paired_speedup(samples["packed"], samples["plain"])["speedup"],
               "split_vs_eager": paired_speedup(samples["eager"], samples["split"])["speedup"],
               "packed_vs_eager": paired_speedup(samples["eager"], samples["packed"])["speedup"],
               "max_abs": max_abs}
        rows.append(row)
        print(f"{name} batch {batch:3d} ({row['rows']} rows): eager {row['eager_ms']:.2f} ms, packed "
              f"{row['packed_ms']:.2f} ({row['packed_vs_eager']:.2f}x eager), plain {row['plain_ms']:.2f}, "
              f"plain/packed {row['plain_vs_packed']:.3f}x; split {row['split_ms']:.2f} "
              f"({row['split_vs_eager']:.2f}x eager)  max_abs {max_abs:.1e}", flush=True)
    runner.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert4rec:base,t5-rec:base")
    ap.add_argument("--batches", default="1,2,4,8,32")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--pipeline", default="O2")
    ap.add_argument("--split-rows", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prefill", action="store_true", help="time the incremental prefill entry (causal models)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg())
    root = Path(tempfile.mkdtemp(prefix="bench-split-rows-"))
    rows = [row for name in args.models.split(",") for row in bench_model(name, args, root)]
    report = {"pipeline": args.pipeline, "split_rows": args.split_rows, "threads": args.threads,
              "entry": "prefill" if args.prefill else "model", "rows": rows}
    finish_report(report, load_start, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
