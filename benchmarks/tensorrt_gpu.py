"""End-to-end GPU check: TensorRT, the CUDA paths of eager/TorchScript/Inductor, and fp16/bf16 pipelines.

Run on a machine with an NVIDIA GPU::

    pip install -e '.[onnx]' tensorrt          # tensorrt from NVIDIA's index where PyPI lacks it
    python benchmarks/tensorrt_gpu.py --model bert4rec:base --batches 1,32 --fp16 --json gpu.json

Steps: static check of the exported ONNX (``graphopt check-tensorrt``), lower
to a TensorRT engine (fp32, and fp16 with ``--fp16``), load, compare to eager
on CUDA, then lower graphopt pipelines (``--pipelines``, ``;``-separated:
O2, O2 + cast to fp16 and to bf16 by default) to Inductor on CUDA, and build
the peers a GPU user would pick (``torch.compile`` of the module under fp16 and
bf16 autocast). Each variant's fidelity is the top-10 overlap with eager fp32 on
CUDA over ``--fidelity-rows`` seeded rows per batch size (the bench's bar:
>= 0.99); timing is interleaved rounds of ``--iters`` calls, medians,
``torch.cuda.synchronize`` around each block. Without TensorRT it still runs the
CUDA paths and says why TensorRT was skipped; without CUDA it exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

BAR = 0.99
DEFAULT_PIPELINES = "O2;O2,cast{dtype=fp16};O2,cast{dtype=bf16}"


def _timed(runner, feeds, n: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        runner(*feeds)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def _compile_peer(module: torch.nn.Module, dtype: torch.dtype):
    """torch.compile of the CUDA module, called under CUDA autocast (the GPU user's default)."""
    compiled = torch.compile(module)

    def fn(*feeds):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            out = compiled(*feeds)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return fn


def _on_cuda(feeds):
    return tuple(f.to("cuda") for f in feeds)


def _fidelity_rows(program, reference, batch: int, rows: int):
    """Seeded feeds (seeds 1+) holding ``rows`` rows at this batch, and ``reference``'s first output
    on them, computed once for every variant (None where the output ranks nothing)."""
    from graphopt.metrics import score_matrix

    feeds = [_on_cuda(program.sample_inputs(batch=batch, seed=s)) for s in range(1, 1 + max(1, rows // batch))]
    outs = [reference(*f)[0].float().cpu() for f in feeds]
    return feeds, (torch.cat(outs) if score_matrix(outs[0], 10) is not None else None)


def _top10(fn, feeds, want) -> float:
    """Top-10 overlap of ``fn``'s first output on ``feeds`` with ``want`` (nan where nothing is ranked)."""
    from graphopt.metrics import topk_overlap

    if want is None:
        return float("nan")
    return topk_overlap(torch.cat([fn(*f)[0].float().cpu() for f in feeds]), want, k=10)


def _build_runners(args, program, module, tmp):
    from graphopt import optimize
    from graphopt.runtime import available_runtimes, load, lower

    status = available_runtimes()
    wanted = args.runtimes.split(",")
    skipped = {n: status[n].reason for n in wanted if not status[n].available}
    variants = [(n, n, program, {}) for n in wanted if status[n].available]
    if args.fp16 and status["tensorrt"].available:
        variants.append(("tensorrt-fp16", "tensorrt", program, {"fp16": True}))
    for text in filter(None, args.pipelines.split(";")):
        try:
            fast, _ = optimize(program, text)
        except Exception as exc:  # noqa: BLE001 - the report says which pipeline failed and why
            skipped[f"{text} @ inductor"] = f"optimize failed: {type(exc).__name__}: {str(exc)[:300]}"
            continue
        variants.append((f"{text} @ inductor", "inductor", fast, {}))
    runners = {}
    for label, name, prog, opts in variants:
        if name in ("eager", "torchscript", "inductor"):
            opts = {**opts, "device": "cuda"}
        start = time.perf_counter()
        try:
            art = lower(prog, name, os.path.join(tmp, f"v{len(runners)}"), **opts)
            runners[label] = load(art.path).activate()
        except Exception as exc:  # noqa: BLE001
            skipped[label] = f"lower/load failed: {type(exc).__name__}: {str(exc)[:300]}"
            continue
        print(f"lowered {label} in {time.perf_counter() - start:.1f}s", flush=True)
    if args.peers:
        cuda_module = module.to("cuda").eval()
        for label, dtype in (("torch.compile-fp16", torch.float16), ("torch.compile-bf16", torch.bfloat16)):
            runners[label] = _compile_peer(cuda_module, dtype)
    return runners, skipped


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert4rec:base")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--fp16", action="store_true", help="also build an fp16 TensorRT engine")
    p.add_argument("--runtimes", default="eager,torchscript,inductor,tensorrt")
    p.add_argument("--pipelines", default=DEFAULT_PIPELINES,
                   help=f"graphopt pipelines lowered to Inductor on CUDA, ';'-separated (default {DEFAULT_PIPELINES!r})")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip the torch.compile+autocast peers")
    p.add_argument("--fidelity-rows", type=int, default=256, help="seeded rows per batch size for top-10 overlap")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("GRAPHOPT_VERIFY_EACH", "0")
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    from graphopt.runtimes.onnx_export import export_onnx
    from graphopt.runtimes.tensorrt_check import check_onnx

    from graphopt.process import quiet_backends
    from graphopt.rec.zoo import load_model

    zm = load_model(args.model)
    program = zm.capture()
    with quiet_backends():
        findings = check_onnx(export_onnx(program))
    errors = [str(f) for f in findings if f.severity == "error"]
    print(f"check-tensorrt {args.model}: {len(errors)} errors", *errors[:5], sep="\n  ")
    results: dict = {"model": args.model, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "check_errors": errors, "bar_top10": BAR, "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runners, skipped = _build_runners(args, program, zm.module, tmp)
        results["skipped"] = skipped
        reference = runners.get("eager")
        for batch in (int(b) for b in args.batches.split(",")):
            feeds = _on_cuda(program.sample_inputs(batch=batch, seed=0))
            ref = tuple(t.float().cpu() for t in program(*program.sample_inputs(batch=batch, seed=0)))
            fidelity = _fidelity_rows(program, reference, batch, args.fidelity_rows) if reference else ([], None)
            rows = {}
            for label, r in list(runners.items()):
                try:
                    for _ in range(3):
                        out = r(*feeds)
                    err = max((o.float().cpu() - e).abs().max().item() for o, e in zip(out, ref))
                    top10 = _top10(r, *fidelity)
                except Exception as exc:  # noqa: BLE001
                    skipped[f"{label} (batch {batch})"] = f"run failed: {type(exc).__name__}: {str(exc)[:300]}"
                    continue
                rows[label] = {"max_abs_err": err, "top10": top10, "samples": []}
            order = list(rows)
            for i in range(args.rounds):
                for label in order[i % len(order):] + order[: i % len(order)]:
                    rows[label]["samples"].append(_timed(runners[label], feeds, args.iters))
            eager = statistics.median(rows["eager"]["samples"]) if "eager" in rows else None
            print(f"\n{args.model} batch {batch} on {results['gpu']} (top-10 vs eager fp32 on {args.fidelity_rows} rows;"
                  f" '*' = fastest at the bar)")
            for row in rows.values():
                row["median_ms"] = statistics.median(row.pop("samples")) * 1e3
                row["speedup_vs_eager"] = eager * 1e3 / row["median_ms"] if eager else None
            at_bar = [k for k, v in rows.items() if k != "eager" and v["top10"] >= BAR]
            best = min(at_bar, key=lambda k: rows[k]["median_ms"]) if at_bar else None
            width = max(map(len, rows), default=10)
            for label, row in rows.items():
                speed = f"{row['speedup_vs_eager']:.2f}x" if eager else "-"
                mark = "*" if label == best else " "
                print(f" {mark}{label:<{width}} {row['median_ms']:8.3f} ms {speed:>7}  top-10 {row['top10']:.4f}"
                      f"  max|err| vs fp32 {row['max_abs_err']:.2g}")
            results["batches"][batch] = {"rows": rows, "best_at_bar": best}
        for r in runners.values():
            if hasattr(r, "deactivate"):
                r.deactivate()
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
