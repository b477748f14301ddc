"""Benchmark: captured Program vs O1 / single fusions / O2, per runtime and batch.

Not a test. Interleaved rounds (every variant once per round, in turn), the
median per-call latency over rounds, and ratios against the unoptimized
captured Program measured in the same run::

    python benchmarks/bench_fusion.py                       # eager + onnxruntime
    python benchmarks/bench_fusion.py --runtimes eager,onnxruntime,inductor
    python benchmarks/bench_fusion.py --models dlrm:base --batches 32 --rounds 30

Timings on a shared machine are noisy: compare ratios from one run, never
absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import graphopt
from graphopt.rec.zoo import load_model

VARIANTS = {
    "bert4rec": {"O1": "O1", "O1+fuse-qkv": "O1,fuse-qkv,dce", "O1+linear-act": "O1,fuse-linear-act,dce", "O2": "O2"},
    "bert-cls": {"O1": "O1", "O1+fuse-qkv": "O1,fuse-qkv,dce", "O2": "O2"},
    "dlrm": {"O1": "O1", "O1+bag-to-gather": "O1,embedding-bag-to-gather,dce",
             "O1+linear-act": "O1,fold-batchnorm,fuse-linear-act,dce", "O2": "O2"},
    "two-tower": {"O1": "O1", "O2": "O2"},
}


def _eager(program: Any) -> Callable[[tuple[torch.Tensor, ...]], Any]:
    gm = program.gm

    def run(inputs: tuple[torch.Tensor, ...]) -> Any:
        with torch.no_grad():
            return gm(*inputs)

    return run


def _onnxruntime(program: Any) -> Callable[[tuple[torch.Tensor, ...]], Any]:
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program.export(), dynamo=True, verbose=False)
    from graphopt.runtimes.onnxruntime import session_options

    opts = session_options(intra_op_threads=torch.get_num_threads(), spin=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    loops = sum(1 for n in onnx_program.model_proto.graph.node if n.op_type == "Loop")
    logging.info("onnx graph: %d nodes, %d Loop", len(onnx_program.model_proto.graph.node), loops)

    def run(inputs: tuple[torch.Tensor, ...]) -> Any:
        return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})

    return run


def _inductor(program: Any) -> Callable[[tuple[torch.Tensor, ...]], Any]:
    compiled = torch.compile(program.gm, dynamic=True)

    def run(inputs: tuple[torch.Tensor, ...]) -> Any:
        with torch.no_grad():
            return compiled(*inputs)

    return run


RUNTIMES = {"eager": _eager, "onnxruntime": _onnxruntime, "inductor": _inductor}


def _time(run: Callable[[tuple[torch.Tensor, ...]], Any], inputs: tuple[torch.Tensor, ...], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        run(inputs)
    return (time.perf_counter() - start) / iters


def bench_model(spec: str, runtimes: list[str], batches: list[int], rounds: int, warmup: int) -> None:
    zoo = load_model(spec)
    base = zoo.capture()
    family = spec.split(":")[0]
    programs = {"captured": base}
    for label, pipeline in VARIANTS.get(family, {"O2": "O2"}).items():
        programs[label], report = graphopt.optimize(base, pipeline, verify_each=False)
        if label == "O2":
            print(f"\n## {spec}: O2 report\n{report.render()}")
    for runtime in runtimes:
        runners = {}
        for label, program in programs.items():
            try:
                runners[label] = RUNTIMES[runtime](program)
            except Exception as e:  # a variant a backend cannot take is reported, not fatal
                print(f"{spec} {runtime} {label}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        for batch in batches:
            inputs = base.sample_inputs(batch=batch, seed=0)
            iters = 20 if batch == 1 else 5
            for run in runners.values():
                for _ in range(warmup):
                    run(inputs)
            samples: dict[str, list[float]] = {label: [] for label in runners}
            for _ in range(rounds):
                for label, run in runners.items():
                    samples[label].append(_time(run, inputs, iters))
            ref = statistics.median(samples["captured"]) if "captured" in samples else None
            print(f"\n{spec}  runtime={runtime}  batch={batch}  rounds={rounds}x{iters}")
            print(f"  {'variant':<18} {'median ms':>10} {'p90 ms':>9} {'speedup vs captured':>20}")
            for label, xs in samples.items():
                med = statistics.median(xs)
                p90 = sorted(xs)[max(0, int(0.9 * len(xs)) - 1)]
                ratio = f"{ref / med:.2f}x" if ref else "-"
                print(f"  {label:<18} {med * 1e3:10.3f} {p90 * 1e3:9.3f} {ratio:>20}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert4rec:base,dlrm:base")
    ap.add_argument("--runtimes", default="eager,onnxruntime", help=f"comma list of {','.join(RUNTIMES)}")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch/ORT intra-op threads (0: torch default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        print(f"bench_fusion: unknown runtime {unknown[0]!r}; choose from {', '.join(RUNTIMES)}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    try:
        import onnxruntime

        print(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    for spec in args.models.split(","):
        bench_model(spec, runtimes, [int(b) for b in args.batches.split(",")], args.rounds, args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
