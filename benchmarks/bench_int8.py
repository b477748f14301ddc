"""int8 that pays: graphopt's static int8 (fp32 and int8-mixed-bf16) against its bf16 and
the int8 peers, in one interleaved run, plus the proof from the generated code.

    python benchmarks/bench_int8.py --model bert4rec:base [--batch-sizes 1,32] [--rounds 15]
        [--threads 2] [-o bench-int8-bert4rec]

Runs ``graphopt.bench`` (eager baseline, ``bf16=O2,cast{dtype=bf16}``,
``int8=O2,quantize-int8``, ``int8-bf16=O2,quantize-int8{mixed=bf16}`` on inductor and
onnxruntime, peers torch.compile(-bf16), ort-int8-dynamic, torchao-pt2e-int8(-bf16)),
every int8 variant calibrated on held-out batches of the bench's inputs (the guard on,
at the fidelity bar). Then lowers the int8 Programs to AOTInductor again and prints what
the generated wrapper calls: oneDNN ``qlinear_pointwise`` per quantized linear with its
output dtype and post-ops, kernels still dequantizing, fp32/bf16 GEMMs left. Prints the
CPU model/flags and the load average before and after; compare ratios within the run.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
import warnings
from pathlib import Path

import graphopt
from graphopt.hardware import cpu_model, reported_flags


def _census(model: str, pipeline: str, calibration) -> None:  # type: ignore[no-untyped-def]
    from graphopt.runtimes.inductor_code import wrapper_calls, wrapper_source

    from graphopt.rec.zoo import load_model

    program = load_model(model).capture()
    q, report = graphopt.optimize(program, pipeline, calibration_data=calibration, verify_each=False)
    with tempfile.TemporaryDirectory() as tmp:
        graphopt.lower(q, "inductor", Path(tmp) / "aoti", device="cpu")
        calls = wrapper_calls(wrapper_source(Path(tmp) / "aoti" / "model.pt2"))
    qlinears = [c for c in calls if c.is_qlinear]
    kinds = collections.Counter((c.output_dtype, c.post_ops) for c in qlinears)
    gemms = [c.kernel for c in calls if c.kernel in ("aoti_torch_cpu_addmm", "aoti_torch_cpu_mm", "aoti_torch_cpu_bmm",
                                                     "aoti_torch_cpu__linear_pointwise", "aoti_torch_cpu__addmm_activation")]
    stats = report.passes[-1].stats
    print(f"\n{pipeline}: {stats.get('linear', 0)} linears int8, {stats.get('kept-float', 0)} kept float by the guard")
    print(f"  qlinear_pointwise calls: {len(qlinears)}  (output dtype, post-ops): "
          + ", ".join(f"{k[0]}{'+' + '+'.join(k[1]) if k[1] else ''} x{v}" for k, v in sorted(kinds.items())))
    print(f"  kernels that dequantize: {sum('dequantize' in c.kernel for c in calls)}; float GEMM calls: {len(gemms)}"
          f" {dict(collections.Counter(gemms))}")
    for note in report.passes[-1].notes:
        print("  note:", note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert4rec:base")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtimes", default="onnxruntime,inductor")
    ap.add_argument("--no-census", action="store_true", help="skip the generated-code census")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"CPU: {cpu_model()} flags: {' '.join(reported_flags())}; load before: {os.getloadavg()}")
    from graphopt.bench.timing import TimingConfig

    start = time.time()
    report = graphopt.bench(
        args.model,
        ["bf16=O2,cast{dtype=bf16}", "int8=O2,quantize-int8", "int8-bf16=O2,quantize-int8{mixed=bf16}"],
        args.runtimes.split(","),
        peers=["torch.compile", "torch.compile-bf16", "ort-int8-dynamic", "torchao-pt2e-int8", "torchao-pt2e-int8-bf16"],
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        seq_lens=[args.seq], threads=args.threads, out_dir=args.output, force=True, memory=False,
        timing=TimingConfig(rounds=args.rounds),
    )
    print(report.render_markdown())
    print(f"bench took {time.time() - start:.0f} s; load after: {os.getloadavg()}")
    if not args.no_census:
        from graphopt.rec.zoo import load_model

        zm = load_model(args.model)
        calibration = [tuple(zm.make_inputs(batch=32, seq=args.seq, seed=1000 + i).values()) for i in range(8)]
        for pipeline in ("O2,quantize-int8", "O2,quantize-int8{mixed=bf16}"):
            _census(args.model, pipeline, calibration)


if __name__ == "__main__":
    main()
