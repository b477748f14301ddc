"""The incremental step's GEMMs on Inductor: MKL on plain weights, oneDNN's packed weights,
Inductor's autotuned CPP GEMM template.

    .venv/bin/python benchmarks/bench_step_kernels.py [--model gpt-rec:base] [--history 64]
        [--batches 1,8,32] [--pipeline O2] [--threads 2] [--rounds 9] [--json FILE]

The step entry of one causal model (``derive_incremental(program, history)``) is lowered
three ways with ``graphopt.lower``, every option explicit: ``plain`` (``weight_prepack=False``,
``max_autotune=False``: ``addmm`` on the plain weights, MKL), ``packed``
(``weight_prepack=True``, ``max_autotune=False``: oneDNN's packed linear) and ``template``
(``weight_prepack=True``, ``max_autotune=True``: Inductor's CPP GEMM template where it wins
the autotuning), and the three packages are timed interleaved in the same rounds per batch
(one new event per user on a full window). ``default`` names the one ``lower_incremental``
picks for this step on this CPU (``InductorBackend.step_defaults``); ``<variant>_vs_default``
is default / variant (median over rounds, paired; > 1: faster than the default). Every
output is checked against the eager step (``<variant>_max_abs``). Absolute milliseconds
depend on the machine's load (recorded); compare the ratios. (Before 2026-12-06 this
script lowered ``packed`` and ``plain`` with ``max_autotune`` left to ``graphopt.lower``'s
per-Program default, which autotunes base-size Programs: its AMD EPYC figures of
2026-12-05 compared the template with MKL.)

The weights' floor, timed in the same rounds: every GEMM weight of the step (``weights_mb``)
read once by an eager one-row-per-user float32 ``linear`` on the same weights, back to back
(``floor_ms``; ``floor_gbs`` = weights_mb / floor_ms): no float32 step can be faster here,
whatever else it saves. Beside it, for whoever weighs a lower-precision step,
``aten._weight_int8pack_mm`` (torchao's int8 weight-only kernel: int8 weights, bf16
activations, a quarter of the bytes) over the same weights at the step's rows
(``w8_ms``) and at a full recompute's ``history`` rows (``w8_full_ms``, against
``floor_full_ms`` for float32): kernels only, a different model's numerics.
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
from graphopt.ir.fx import fetch_attr
from graphopt.passlib.incremental import derive_incremental
from graphopt.passlib.linear_forms import as_linears
from graphopt.passlib.qdq import find_linears, quantize_weight
from graphopt.rec.zoo import load_model
from graphopt.runtime import get_runtime

#: the step lowerings timed, each with every option that decides its GEMMs explicit
VARIANTS = {
    "plain": {"weight_prepack": False, "max_autotune": False},
    "packed": {"weight_prepack": True, "max_autotune": False},
    "template": {"weight_prepack": True, "max_autotune": True},
}


def step_weights(step: graphopt.Program) -> list[torch.Tensor]:
    """Every constant GEMM weight the step reads, ``(out, in)`` float32 (on a copy: addmm / mm
    forms are rewritten into linear to find them)."""
    copy = step.copy()
    as_linears(copy.gm)
    return [fetch_attr(copy.gm, layer.weight).detach().float().contiguous()
            for layer in find_linears(copy.gm)[0]]


def floor_fns(weights: list[torch.Tensor], rows: int, history: int) -> dict[str, object]:
    """Zero-argument callables reading every weight once: float32 linear at ``rows`` and
    ``history`` rows, and the int8 weight-only kernel at both (absent where this torch lacks it)."""
    x = {(n, k): torch.randn(n, k) for n in (rows, history) for k in {w.shape[1] for w in weights}}
    fns = {name: (lambda n=n: [torch.nn.functional.linear(x[n, w.shape[1]], w) for w in weights])
           for name, n in (("floor", rows), ("floor_full", history))}
    packed = [(q, s.to(torch.bfloat16)) for q, s, _ in (quantize_weight(w, bits=8) for w in weights)]
    xb = {key: v.to(torch.bfloat16) for key, v in x.items()}
    try:
        torch.ops.aten._weight_int8pack_mm(xb[rows, weights[0].shape[1]], *packed[0])
    except (AttributeError, RuntimeError) as e:
        print(f"int8 weight-only kernel unavailable: {str(e).splitlines()[0]}", flush=True)
        return fns
    for name, n in (("w8", rows), ("w8_full", history)):
        fns[name] = (lambda n=n: [torch.ops.aten._weight_int8pack_mm(xb[n, q.shape[1]], q, s) for q, s in packed])
    return fns


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
    weights = step_weights(inc.step)
    weights_mb = sum(w.numel() * 4 for w in weights) / 1e6
    items = int(zm.config["items"])
    root = Path(tempfile.mkdtemp(prefix="bench-step-kernels-"))
    # the step's defaults on this CPU over Inductor's own (packed weights; a step not autotuned)
    defaults = {"weight_prepack": True, "max_autotune": False,
                **get_runtime("inductor").step_defaults(inc.step, {"device": "cpu"})}
    default = next(n for n, opts in VARIANTS.items() if all(defaults[k] == v for k, v in opts.items()))
    runners, compile_s = {}, {}
    for name, opts in VARIANTS.items():
        t0 = time.perf_counter()
        graphopt.lower(inc.step, "inductor", root / name, device="cpu", **opts)
        compile_s[name] = time.perf_counter() - t0
        print(f"lowered {name} in {compile_s[name]:.1f}s{' (the step default here)' if name == default else ''}",
              flush=True)
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
        fns.update(floor_fns(weights, batch, batch * args.history))
        with torch.inference_mode():
            samples = run_interleaved(fns, config)
        row = {"batch": batch, "history": args.history, "default": default}
        for name in samples:
            row[f"{name}_ms"] = summarize(samples[name], batch)["p50_ms"]
        for name, r in runners.items():
            row[f"{name}_vs_default"] = paired_speedup(samples[default], samples[name])["speedup"]
            row[f"{name}_max_abs"] = float((r(new, *state)[0] - want).abs().max())
        row["weights_mb"] = weights_mb
        row["floor_gbs"] = weights_mb / row["floor_ms"]
        rows.append(row)
        w8 = (f"; int8 weight-only kernel {row['w8_ms']:.3f} ms, at {batch * args.history} rows "
              f"{row['w8_full_ms']:.3f} ms" if "w8_ms" in row else "")
        timed = "  ".join(f"{n} {row[f'{n}_ms']:.3f} ms ({row[f'{n}_vs_default']:.2f}x)" for n in runners)
        print(f"{args.model} {args.pipeline} history {args.history} batch {batch:3d}: {timed}  (x: vs the default, "
              f"{default})  max_abs {max(row[f'{n}_max_abs'] for n in runners):.1e}\n    weights floor (float32, "
              f"{weights_mb:.1f} MB read once): {row['floor_ms']:.3f} ms ({row['floor_gbs']:.0f} GB/s), at "
              f"{batch * args.history} rows {row['floor_full_ms']:.3f} ms{w8}", flush=True)
    for r in runners.values():
        r.close()
    report = {"model": args.model, "pipeline": args.pipeline, "threads": args.threads, "rows": rows,
              "lower_seconds": compile_s}
    finish_report(report, load_start, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
