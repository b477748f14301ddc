"""Where a lowered variant's time goes, kernel by kernel: a zoo model's pipelines on Inductor.

    python benchmarks/profile_kernels.py [--model bert4rec:base] [--batch 32] [--seq 64]
        [-p "bf16=O2,cast{dtype=bf16}" -p "int8-bf16=O2,quantize-int8{mixed=bf16}"]
        [--calls 20] [--threads 2] [--out DIR] [--rows 25]

Each pipeline is optimized with the bench's own calibration batches (16 of 32 of the
model's inputs, seeds 1000+: graphopt.bench.calibration), lowered to an AOTInductor
package with Inductor's kernel profile on (``TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1``:
every generated kernel and every oneDNN / ATen call the wrapper makes is a profiler
event), timed (``--calls`` calls after 5 warm-up calls) and run ``--calls`` times
more under ``torch.profiler``. Printed per variant: ms per call, the time per call
of each kind of kernel (int8 GEMMs: oneDNN's ``qlinear_pointwise``; float GEMMs:
oneDNN's ``linear_pointwise`` and ATen's mm / addmm; Inductor's GEMM templates
(``gemm_*``, which run int8 or float); attention; the generated pointwise / norm /
quantize kernels; the rest) and the ``--rows`` most expensive events. A package
is kept under ``--out`` and reused if it is there (delete it to compile again).

Caveat, torch 2.13: with the kernel profile on, Inductor's CPP GEMM templates
fail to compile while autotuning (an error per candidate on stderr), so an
autotuned package runs oneDNN's GEMMs where the plain one would run templates:
the profile is of the all-oneDNN form, within 1% of the autotuned one's time on
bert4rec:base (``bench_inductor_settings.py``, AMD EPYC Zen 4, 2026-12-07).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import graphopt
from graphopt.bench.calibration import bench_calibration
from graphopt.hardware import cpu_model, reported_flags
from graphopt.models import load_model

KINDS = (("int8 GEMM (oneDNN)", ("qlinear_pointwise",)), ("float GEMM (oneDNN / ATen)", ("_linear_pointwise",
         "aoti_torch_cpu_mm", "aoti_torch_cpu_addmm", "aoti_torch_cpu_bmm")),
         ("GEMM template (Inductor)", ("_gemm_",)), ("attention", ("scaled_dot_product", "_sdpa")),
         ("generated kernels", ("cpp_fused",)))


def _kind(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys) and not (kind == "attention" and "cpp_fused" in name):
            return kind
    return "rest (ATen views, allocation, ...)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert4rec:base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("-p", "--pipeline", action="append", default=None, help="label=pipeline text")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default="profile-kernels")
    args = ap.parse_args()
    pipelines = dict(p.split("=", 1) for p in (args.pipeline or ["bf16=O2,cast{dtype=bf16}",
                                                                 "int8-bf16=O2,quantize-int8{mixed=bf16}"]))
    # on in this process's Inductor and in any fresh interpreter a lowering compiles in (its environment)
    os.environ["TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE"] = "1"
    import torch._inductor.config

    torch._inductor.config.cpp.enable_kernel_profile = True
    torch.set_num_threads(args.threads)
    zm = load_model(args.model)
    program = zm.capture()

    def inputs(batch: int, seq: int | None, seed: int) -> tuple[torch.Tensor, ...]:
        return tuple(zm.make_inputs(batch=batch, seq=seq, seed=seed).values())

    calibration, _ = bench_calibration(inputs, [(args.batch, args.seq)])
    feeds = inputs(args.batch, args.seq, 1)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} · {cpu_model()} · flags {' '.join(reported_flags())} · "
          f"torch {torch.__version__} · {args.threads} threads · {args.model} batch {args.batch} seq {args.seq}")
    for label, text in pipelines.items():
        path = os.path.join(args.out, label)
        if not os.path.isdir(path):
            optimized, _ = graphopt.optimize(program, text, calibration_data=calibration)
            graphopt.lower(optimized, "inductor", path)
        with graphopt.load(path) as runner:
            for _ in range(5):
                runner(*feeds)
            start = time.perf_counter()
            for _ in range(args.calls):
                runner(*feeds)
            ms = (time.perf_counter() - start) / args.calls * 1e3
            with torch.profiler.profile() as prof:
                for _ in range(args.calls):
                    runner(*feeds)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        kinds: dict[str, float] = {}
        for e in events:
            kinds[_kind(e.key)] = kinds.get(_kind(e.key), 0.0) + e.self_cpu_time_total / 1e3 / args.calls
        print(f"\n## {label} = {text}: {ms:.2f} ms per call (profiled: {sum(kinds.values()):.2f} ms)")
        for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {t:7.2f} ms  {kind}")
        print("  most expensive events (ms per call, calls per call):")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            print(f"  {e.self_cpu_time_total / 1e3 / args.calls:7.3f}  {e.count // args.calls:3d}  {e.key[:110]}")


if __name__ == "__main__":
    main()
