"""oneDNN's int8 GEMM against its bf16 (or float32) GEMM, shape by shape: what int8 can pay on this CPU.

    python benchmarks/bench_int8_gemm.py [--rows 2048] [--shapes 256x768,256x1024,1024x256,...]
        [--rounds 30] [--threads 2] [--float auto|bf16|fp32] [--epilogues]

The kernels Inductor's x86 lowerings call: ``onednn::qlinear_pointwise`` (u8
activations, per-channel s8 weights prepacked by ``onednn::qlinear_prepack``,
bf16 bias; output u8 when the next op is quantized, bf16 otherwise) and
``mkldnn::_linear_pointwise`` (bf16, weights packed by
``_reorder_linear_weight``), each without a post-op and with the exact-GELU
post-op an FFN's up-projection fuses. Shapes are ``reduction x columns`` at
``--rows`` rows (batch x sequence); the defaults are bert-cls/bert4rec:base's
GEMMs at batch 32 x 64 (width 256, FFN 1024) and the large size's (768, 3072).
Every case is timed once per round, rounds interleaved, medians reported with
the float/int8 time ratio and both GEMMs' throughput (GOP/s). ``--float auto`` compares with
bf16 where oneDNN has bf16 kernels (``graphopt.hardware.has_bf16_kernels``) and with float32
elsewhere (an AVX2-only CPU, where bf16 is reference code): there the int8 ceiling is against
float32 (AMD EPYC, AVX2, 2 threads, 2026-12-06: int8 1.8-2.0x float32 at base-size shapes). Prints the CPU model and flags. glibc is told to keep
freed memory (``mallopt``) so each call's multi-MB output comes from the heap, not
from fresh zeroed pages: without that the page faults took up to 3x the kernel's
own time here and changed from run to run (a whole Inductor package at batch 32
showed no such difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from graphopt.hardware import cpu_model, has_bf16_kernels, reported_flags

DEFAULT_SHAPES = "256x768,256x256,256x1024,1024x256,768x2304,768x3072,3072x768"


def _cases(rows: int, k: int, n: int, fl: torch.dtype, epilogues: bool = False) -> dict[str, object]:
    """The float GEMM (``fl``: bf16 or float32, oneDNN's packed linear) and oneDNN's int8 GEMM
    writing ``fl`` or u8, each plain and with the fused exact GELU (``epilogues``: also the tanh GELU
    and relu, int8 writing u8)."""
    torch.manual_seed(0)
    x8 = torch.randint(0, 255, (rows, k), dtype=torch.uint8)
    w8 = torch.ops.onednn.qlinear_prepack(torch.randint(-127, 127, (n, k), dtype=torch.int8), [rows, k])
    w_scale, w_zp = torch.rand(n) * 0.01, torch.zeros(n, dtype=torch.int64)
    bias = torch.randn(n).to(fl)
    xb = torch.randn(rows, k).to(fl)
    wb = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k).to(fl), rows)

    def q(post: str, out: torch.dtype, algorithm: str = "none"):  # type: ignore[no-untyped-def]
        scale, zp = (0.05, 128) if out == torch.uint8 else (1.0, 0)
        return lambda: torch.ops.onednn.qlinear_pointwise(x8, 0.02, 128, w8, w_scale, w_zp, bias, scale, zp, out,
                                                          post, [], algorithm)

    def fe(post: str, algorithm: str):  # type: ignore[no-untyped-def]
        return lambda: torch.ops.mkldnn._linear_pointwise(xb, wb, bias, post, [], algorithm)

    cases = {
        "float": fe("none", ""),
        "int8->float": q("none", fl),
        "int8->u8": q("none", torch.uint8),
        "float+gelu": fe("gelu", "none"),
        "int8+gelu->u8": q("gelu", torch.uint8),
    }
    if epilogues:  # the other epilogues an FFN's up-projection could fuse
        cases.update({"float+gelu_tanh": fe("gelu", "tanh"), "int8+gelu_tanh->u8": q("gelu", torch.uint8, "tanh"),
                      "float+relu": fe("relu", ""), "int8+relu->u8": q("relu", torch.uint8)})
    return cases


def _keep_freed_memory() -> None:
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: measure as is
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed
    libc.mallopt(m_trim_threshold, 1 << 30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="reduction x columns, comma-separated")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epilogues", action="store_true",
                    help="also time the tanh-approximate GELU and relu epilogues (a second table)")
    ap.add_argument("--float", default="auto", choices=("auto", "bf16", "fp32"),
                    help="the float GEMM int8 is compared with (auto: bf16 where oneDNN has bf16 kernels, else fp32)")
    args = ap.parse_args()
    name = args.float if args.float != "auto" else ("bf16" if has_bf16_kernels() else "fp32")
    fl = torch.bfloat16 if name == "bf16" else torch.float32
    torch.set_num_threads(args.threads)
    _keep_freed_memory()
    print(f"CPU: {cpu_model()} flags: {' '.join(reported_flags())}; torch {torch.__version__}; "
          f"{args.threads} threads; load before: {os.getloadavg()}")
    print(f"| rows x red. x cols | GFLOP | {name} ms | int8->{name} | int8->u8 | {name}/int8 | {name} GOP/s | "
          f"int8 GOP/s | {name}+GELU | int8+GELU->u8 | {name}/int8 with GELU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    epilogue_rows = []
    with torch.no_grad():
        for shape in args.shapes.split(","):
            k, n = (int(v) for v in shape.split("x"))
            cases = _cases(args.rows, k, n, fl, args.epilogues)
            times: dict[str, list[float]] = {case: [] for case in cases}
            for fn in cases.values():
                for _ in range(3):
                    fn()  # type: ignore[operator]
            for _ in range(args.rounds):
                for case, fn in cases.items():
                    t = time.perf_counter()
                    fn()  # type: ignore[operator]
                    times[case].append((time.perf_counter() - t) * 1e3)
            ms = {case: statistics.median(v) for case, v in times.items()}
            gflop = 2 * args.rows * k * n / 1e9
            print(f"| {args.rows}x{k}x{n} | {gflop:.2f} | {ms['float']:.3f} | {ms['int8->float']:.3f} | "
                  f"{ms['int8->u8']:.3f} | {ms['float'] / ms['int8->float']:.2f}x | {gflop / ms['float'] * 1e3:.0f} | "
                  f"{gflop / ms['int8->float'] * 1e3:.0f} | {ms['float+gelu']:.3f} | {ms['int8+gelu->u8']:.3f} |"
                  f" {ms['float+gelu'] / ms['int8+gelu->u8']:.2f}x |", flush=True)
            if args.epilogues:
                epilogue_rows.append(f"| {args.rows}x{k}x{n} | " + " | ".join(
                    f"{ms[f'float{e}']:.3f} / {ms[f'int8{e}->u8' if e else 'int8->u8']:.3f}"
                    for e in ("", "+gelu", "+gelu_tanh", "+relu")) + " |")
    if epilogue_rows:
        print(f"\nEpilogues, ms ({name} / int8 -> u8):")
        print("| rows x red. x cols | none | exact GELU | tanh GELU | relu |")
        print("|---|---|---|---|---|")
        print("\n".join(epilogue_rows))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
