"""The serving process's heap: glibc's default against the policy a graphopt runner sets.

    .venv/bin/python benchmarks/bench_heap.py [--model bert4rec:base] [--pipeline "O2,cast{dtype=bf16}"]
        [--batch 32] [--seq 64] [--variants eager,inductor,torch.compile-bf16] [--rounds 3] [--calls 30]
        [--threads 2] [-o heap.md]

A graphopt runner keeps freed memory in its process (``graphopt.process.keep_freed_memory``:
glibc's mmap threshold 32 MiB, trim threshold 1 GiB); the policy is process-wide and set once,
so it cannot be A/B-tested inside one process. Here every measurement is a fresh interpreter
that loads one variant, makes 3 untimed calls and times ``--calls`` calls, with
``GRAPHOPT_KEEP_HEAP=0`` (glibc as it is) or without (the policy): per round every variant
under both, the order alternating, and the table gives the median over rounds of each child's
p50 and its minor page faults per call (``getrusage``). Variants: ``eager`` (the zoo model
in float32), ``inductor`` (``--pipeline`` lowered once to an AOTInductor package by this
process, with the runtime's defaults), ``torch.compile-bf16`` (the bench's peer: bf16
autocast, freezing; compiled in each child). Ratios compare the two policies of one variant
across interleaved children; absolute milliseconds depend on the machine's load (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import graphopt
from graphopt.bench.timing import machine_info
from graphopt.passlib.calibration import default_calibration
from graphopt.rec.zoo import load_model

POLICIES = {"glibc default": {"GRAPHOPT_KEEP_HEAP": "0"}, "graphopt's policy": {}}


def child(args: argparse.Namespace) -> None:
    """One variant in this fresh interpreter: its p50 and page faults per call, as JSON on stdout."""
    from graphopt.process import heap_policy, keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # what activating a runner does; a no-op under GRAPHOPT_KEEP_HEAP=0
    zm = load_model(args.model)
    x = tuple(zm.make_inputs(batch=args.batch, seq=args.seq, seed=0).values())
    if args.child == "inductor":
        runner = graphopt.load(args.package).activate()
        call = lambda: runner(*x)  # noqa: E731
    elif args.child == "torch.compile-bf16":
        from graphopt.bench.peers import _compiled

        peer = _compiled(zm.module.eval(), bf16=True)
        call = lambda: peer(*x)  # noqa: E731
    else:
        module = zm.module.eval()

        def call():
            with torch.no_grad():
                return module(*x)
    for _ in range(3):
        call()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.calls
    print(json.dumps({"p50_ms": statistics.median(times) * 1e3, "faults": faults, "heap": heap_policy()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert4rec:base")
    ap.add_argument("--pipeline", default="O2,cast{dtype=bf16}")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--variants", default="eager,inductor,torch.compile-bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", default="heap.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--package", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    started = time.time()
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="graphopt-heap-") as tmp:
        package = Path(tmp) / "inductor"
        if "inductor" in variants:
            captured = load_model(args.model).capture()
            calibration = {"calibration_data": default_calibration(captured)} if "quantize" in args.pipeline else {}
            program, _ = graphopt.optimize(captured, args.pipeline, verify_each=False, **calibration)
            graphopt.lower(program, "inductor", package, device="cpu", threads=args.threads)
        results: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.rounds):
            for variant in variants:
                order = list(POLICIES) if r % 2 == 0 else list(POLICIES)[::-1]
                for policy in order:
                    cmd = [sys.executable, __file__, "--child", variant, "--package", str(package),
                           "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
                           "--calls", str(args.calls), "--threads", str(args.threads)]
                    env = {k: v for k, v in os.environ.items() if k != "GRAPHOPT_KEEP_HEAP"}
                    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, **POLICIES[policy]},
                                          timeout=1800)
                    if proc.returncode != 0:
                        raise SystemExit(f"{variant} under {policy} failed: {proc.stderr.strip().splitlines()[-1]}")
                    results.setdefault((variant, policy), []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    print(f"round {r + 1} {variant} {policy}: {results[(variant, policy)][-1]}", flush=True)
    lines = ["| variant | heap | p50 ms (median of rounds) | page faults per call | default / policy |",
             "|---|---|---|---|---|"]
    for variant in variants:
        p50 = {p: statistics.median(x["p50_ms"] for x in results[(variant, p)]) for p in POLICIES}
        for policy in POLICIES:
            faults = statistics.median(x["faults"] for x in results[(variant, policy)])
            ratio = f"{p50['glibc default'] / p50[policy]:.2f}x" if policy != "glibc default" else ""
            lines.append(f"| {variant} | {policy} | {p50[policy]:.2f} | {faults:.0f} | {ratio} |")
    cpu = machine_info()
    head = (f"# Heap policy\n\n`python benchmarks/bench_heap.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"{time.time() - started:.0f} s. CPU: {cpu['cpu']} ({', '.join(cpu['cpu_flags'])}), load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch {torch.__version__}. {args.model} "
            f"batch {args.batch} seq {args.seq}, inductor = `{args.pipeline}`, {args.threads} threads.\n\n")
    Path(args.output).write_text(head + "\n".join(lines) + "\n")
    print(head + "\n".join(lines))


if __name__ == "__main__":
    main()
