"""End-to-end GPU check: TensorRT, the CUDA paths of eager/TorchScript/Inductor, and fp16/bf16 pipelines.

Run on a machine with an NVIDIA GPU::

    pip install -e '.[onnx]' tensorrt    # CUDA 13 driver; on a CUDA 12 driver: tensorrt-cu12 instead
    python benchmarks/tensorrt_gpu.py --model bert4rec:base --batches 1,32 --json gpu.json

Steps: static check of the ONNX the tensorrt runtime parses (``graphopt
check-tensorrt``, ``for_tensorrt=True``), lower to TensorRT engines (strongly
typed, TensorRT 10 or 11: the Program's dtypes decide the precision) for the
captured fp32 Program and for graphopt pipelines (``--trt-pipelines``,
``;``-separated: O2 + cast to fp16 and symmetric int8 Q/DQ by default), one
engine per timed batch whose optimization profile covers every timed batch
with ``opt`` at that batch; load, compare to eager on CUDA, then lower graphopt
pipelines (``--pipelines``: O2, O2 + cast to fp16 and to bf16 by default) to
Inductor on CUDA, and build the peers a GPU user would pick (``torch.compile``
of the module under fp16 and bf16 autocast). Each variant's fidelity is the
top-10 overlap with eager fp32 on CUDA over ``--fidelity-rows`` seeded rows per
batch size (the bench's bar: >= 0.99); timing is interleaved rounds of
``--iters`` calls, medians, ``torch.cuda.synchronize`` around each block.
Without TensorRT it still runs the CUDA paths and says why TensorRT was
skipped; without CUDA it exits 2.
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
DEFAULT_TRT_PIPELINES = "O2,cast{dtype=fp16};quantize-int8{activations=int8}"


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


def _optimized(program, text: str, label: str, skipped: dict):
    """``program`` through the pipeline ``text`` (calibration rows for int8), or None with the reason."""
    from graphopt import optimize

    calib = [program.sample_inputs(seed=100 + i) for i in range(8)]
    try:
        return optimize(program, text, calibration_data=calib)[0]
    except Exception as exc:  # noqa: BLE001 - the report says which pipeline failed and why
        skipped[label] = f"optimize failed: {type(exc).__name__}: {str(exc)[:300]}"
        return None


def _lower_load(label, name, prog, opts, where, runners, skipped) -> None:
    from graphopt.runtime import load, lower

    start = time.perf_counter()
    try:
        runners[label] = load(lower(prog, name, where, **opts).path).activate()
    except Exception as exc:  # noqa: BLE001
        skipped[label] = f"lower/load failed: {type(exc).__name__}: {str(exc)[:300]}"
        return
    print(f"lowered {label} in {time.perf_counter() - start:.1f}s", flush=True)


def _build_runners(args, program, module, tmp, batches):
    """(runners shared by every batch, {batch: TensorRT runners whose profile's opt is that batch}, skipped)."""
    from graphopt.runtime import available_runtimes

    status = available_runtimes()
    wanted = args.runtimes.split(",")
    skipped = {n: status[n].reason for n in wanted if not status[n].available}
    trt = []
    if "tensorrt" in wanted and status["tensorrt"].available:
        trt.append(("tensorrt", program))
        for text in filter(None, args.trt_pipelines.split(";")):
            if (fast := _optimized(program, text, f"{text} @ tensorrt", skipped)) is not None:
                trt.append((f"{text} @ tensorrt", fast))
    variants = [(n, n, program) for n in wanted if status[n].available and n != "tensorrt"]
    for text in filter(None, args.pipelines.split(";")):
        if (fast := _optimized(program, text, f"{text} @ inductor", skipped)) is not None:
            variants.append((f"{text} @ inductor", "inductor", fast))
    runners: dict = {}
    for label, name, prog in variants:
        opts = {"device": "cuda"} if name in ("eager", "torchscript", "inductor") else {}
        _lower_load(label, name, prog, opts, os.path.join(tmp, f"v{len(runners)}"), runners, skipped)
    per_batch: dict = {b: {} for b in batches}
    for b in batches:  # the profile covers every timed batch; TensorRT tunes its kernels at opt
        profile = f"batch={min(batches)}:{b}:{max(batches)}"
        for label, prog in trt:
            where = os.path.join(tmp, f"trt-b{b}-{len(per_batch[b])}")
            _lower_load(label, "tensorrt", prog, {"profile": profile}, where, per_batch[b], skipped)
    if args.peers:
        cuda_module = module.to("cuda").eval()
        for label, dtype in (("torch.compile-fp16", torch.float16), ("torch.compile-bf16", torch.bfloat16)):
            runners[label] = _compile_peer(cuda_module, dtype)
    return runners, per_batch, skipped


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert4rec:base")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--trt-pipelines", default=DEFAULT_TRT_PIPELINES,
                   help=f"graphopt pipelines lowered to TensorRT, ';'-separated (default {DEFAULT_TRT_PIPELINES!r})")
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
        findings = check_onnx(export_onnx(program, for_tensorrt=True))  # what the tensorrt lowering parses
    errors = [str(f) for f in findings if f.severity == "error"]
    print(f"check-tensorrt {args.model}: {len(errors)} errors", *errors[:5], sep="\n  ")
    results: dict = {"model": args.model, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "check_errors": errors, "bar_top10": BAR, "batches": {}}
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        shared, per_batch, skipped = _build_runners(args, program, zm.module, tmp, batches)
        results["skipped"] = skipped
        reference = shared.get("eager")
        for batch in batches:
            runners = {**shared, **per_batch[batch]}
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
        for r in [*shared.values(), *(r for b in per_batch.values() for r in b.values())]:
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
