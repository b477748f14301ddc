"""Size benchmark (issue 16): the Os/Oz presets on the CTR models, next to fp32 O2.

    .venv/bin/python benchmarks/bench_size.py -o bench-size [--models dlrm:base,two-tower:base]
        [--runtimes onnxruntime,inductor] [--threads 2] [--rounds 8] [--part size,overlap,movielens]
        [--ml-runtimes eager,onnxruntime] [--finetune-epochs 4]

Part ``size`` (the zoo models, synthetic weights, Zipf-skewed inputs): every
pipeline (fp32 ``O2``, ``Os`` = 8-bit tables, ``Oz`` = 4-bit tables) on every
runtime through ``graphopt.bench`` at batch 256: artifact size on disk and its
ratio to fp32 O2 on the same runtime, top-25 overlap with eager over 256
candidates (dlrm ranks the batch's 256 rows; two-tower ranks each user's 100
candidates, 256 users), latency as the harness's interleaved paired ratio to
eager (and Os/fp32 on the same runtime = the quotient of the two ratios,
measured in the same rounds) and peak RSS of the variant alone in a subprocess.

Part ``overlap``: top-25 overlap with eager over 8 held-out batches of 256
(mean and min; on the optimized Program, which every runtime matches within
1e-5), since one batch's overlap moves by several points from batch to batch.

Part ``movielens``: the model fine-tuned on MovieLens-100K clicks (rating >= 4,
``graphopt finetune``'s objective; cached in the output folder), then the
same pipelines plus ``Os-all``/``Oz-all`` (every table quantized, the
1,024-row threshold off, so the user table is quantized too) judged on AUC
and logloss over the 10,000 held-out ratings next to eager's and the
item-popularity baseline's.

Writes ``OUT/size.md`` (the tables), ``OUT/size.json`` and each bench report
under ``OUT/<part>-<model>/``. Absolute milliseconds depend on the machine and
its load (recorded); compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import graphopt
from graphopt.bench import ClickEvalData
from graphopt.hardware import cpu_model, reported_flags
from graphopt.transform.base import get_preset

PIPELINES = ["fp32=O2", "Os=Os", "Oz=Oz"]
#: Os/Oz with the 1,024-row threshold off: every table quantized (the same passes, in the same order)
ALL_TABLES = {f"{p}-all": get_preset(p).replace("min_rows=1024", "min_rows=0") for p in ("Os", "Oz")}


def _mb(n: Any) -> str:
    return f"{n / 1e6:.2f}" if isinstance(n, (int, float)) else "-"


def _rows(report: Any, shape: str) -> list[dict[str, Any]]:
    """One dict per variant at ``shape``: size, ratio to fp32 on its runtime, overlap, speed, memory, eval."""
    out = []
    by_name = {r["variant"]: r for r in report.rows(shape)}
    for v in report.variants:
        r = by_name.get(v["name"], {})
        label, _, runtime = v["name"].partition(" @ ")
        out.append({
            "variant": v["name"], "label": label, "runtime": runtime or "eager (original module)",
            "status": v["status"], "reason": v.get("reason", ""), "size_bytes": v.get("size_bytes"),
            "topk_overlap": r.get("accuracy", {}).get("topk_overlap"),
            "speedup_vs_eager": r.get("speedup", {}).get("speedup"),
            "p50_ms": r.get("latency", {}).get("p50_ms"),
            "peak_mb": v.get("memory", {}).get("peak_mb"), "model_mb": v.get("memory", {}).get("model_mb"),
            "eval": v.get("eval", {}),
        })
    fp32 = {row["runtime"]: row for row in out if row["label"] == "fp32" and row["status"] == "ok"}
    for row in out:
        base = fp32.get(row["runtime"])
        ok = base is not None and row["status"] == "ok"
        row["size_ratio"] = base["size_bytes"] / row["size_bytes"] if ok and row["size_bytes"] else None
        row["speed_vs_fp32"] = (row["speedup_vs_eager"] / base["speedup_vs_eager"]
                                if ok and row["speedup_vs_eager"] and base["speedup_vs_eager"] else None)
    return out


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def size_part(model: str, runtimes: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    report = graphopt.bench(model, PIPELINES, ["eager", *runtimes], batch_sizes=[256], k=25, threads=args.threads,
                            timing=_timing(args), out_dir=out / f"size-{model.replace(':', '-')}", force=True)
    shape = report.shapes[0]
    rows = _rows(report, shape)
    lines = [f"### {model}: size, ranking, latency, memory (batch 256, synthetic weights, Zipf inputs)", "",
             "| variant | MB on disk | vs fp32 | top-25 vs eager | speed vs eager | vs fp32 same runtime | "
             "peak RSS MB | model MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['status']}: {r['reason'][:80]} | | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {_mb(r['size_bytes'])} | {_fmt(r['size_ratio'], '.2f')}x | "
                     f"{_fmt(r['topk_overlap'], '.3f')} | {_fmt(r['speedup_vs_eager'], '.2f')}x | "
                     f"{_fmt(r['speed_vs_fp32'], '.2f')}x | {_fmt(r['peak_mb'], '.0f')} | {_fmt(r['model_mb'], '.0f')} |")
    return {"model": model, "shape": shape, "rows": rows, "markdown": lines}


def overlap_part(model: str, batches: int = 8) -> dict[str, Any]:
    from graphopt.metrics import topk_overlap
    from graphopt.rec.zoo import load_model

    zm = load_model(model)
    program = zm.capture()
    held = [tuple(zm.make_inputs(batch=256, seed=500 + i).values()) for i in range(batches)]
    want = [zm.module(*x) for x in held]
    lines = [f"### {model}: top-25 overlap with eager over {batches} batches of 256 (Program)", "",
             "| pipeline | mean | min | max |", "|---|---|---|---|"]
    rows = {}
    for spec in PIPELINES:
        label, _, text = spec.partition("=")
        q, _ = graphopt.optimize(program, text)
        # dlrm: the batch's 256 rows are the candidates; two-tower: each user's own candidates
        ov = [topk_overlap(q(*x)[0].reshape(-1) if w.shape[-1] == 1 else q(*x)[0],
                           w.reshape(-1) if w.shape[-1] == 1 else w, 25) for x, w in zip(held, want)]
        rows[label] = {"mean": sum(ov) / len(ov), "min": min(ov), "max": max(ov)}
        lines.append(f"| {label} | {rows[label]['mean']:.3f} | {min(ov):.3f} | {max(ov):.3f} |")
    return {"model": model, "rows": rows, "markdown": lines}


def _timing(args: argparse.Namespace) -> Any:
    from graphopt.bench import TimingConfig

    base = TimingConfig()
    return TimingConfig(base.warmup, args.rounds, base.round_time_s, base.max_calls)


def _finetuned(spec: str, out: Path, epochs: int) -> Any:
    from graphopt.rec.data.ctr import load_clicks
    from graphopt.rec.finetune import (
        FinetuneConfig,
        finetune,
        is_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )

    ckpt = out / f"ckpt-{spec.replace(':', '-')}"
    data = load_clicks()
    if not is_checkpoint(ckpt):
        # a fixed number of epochs (no time budget): reproducible from the seed on any machine; one
        # training thread (several spin against each other on a loaded machine)
        config = FinetuneConfig(max_minutes=None, epochs=epochs, batch_size=256, patience=2, precision="fp32",
                                threads=1, seed=0)
        save_checkpoint(finetune(spec, data, config), ckpt)
    return load_checkpoint(ckpt), data


def movielens_part(spec: str, runtimes: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    ckpt, data = _finetuned(spec, out, args.finetune_epochs)
    rows_data = ckpt.objective.encode(data.split(seed=0), "test", ckpt.model_config)
    names = list(rows_data.inputs)
    batch = 256
    n = len(rows_data) - len(rows_data) % batch
    batches = [tuple(rows_data.inputs[k][i:i + batch] for k in names) for i in range(0, n, batch)]
    eval_data = ClickEvalData(batches, rows_data.clicks[:n], name="ml-100k test ratings")
    zoo = ckpt.zoo_model(batch=batch)

    def make(batch: int = 4, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        pick = torch.randint(0, len(rows_data), (batch,), generator=torch.Generator().manual_seed(seed))
        return {k: v[pick] for k, v in rows_data.inputs.items()}

    zoo.make_inputs = make
    pipelines = PIPELINES + [f"{k}={v}" for k, v in ALL_TABLES.items()]
    report = graphopt.bench(zoo, pipelines, runtimes, batch_sizes=[batch], k=25, threads=args.threads,
                            timing=_timing(args), eval_data=eval_data, memory=False,
                            out_dir=out / f"movielens-{spec.replace(':', '-')}", force=True)
    rows = _rows(report, report.shapes[0])
    pop = ckpt.meta["metrics"]["popularity"]["test"]
    ref = report.eval_reference
    lines = [f"### {spec} fine-tuned on MovieLens-100K clicks: AUC/logloss on {n} held-out ratings", "",
             f"Fine-tuning: {ckpt.meta['training']['stopped']}, {ckpt.meta['training'].get('epochs_run', ckpt.meta['training']['epochs'])} epochs; test "
             f"AUC {ckpt.meta['metrics']['test']['auc']:.4f}, logloss {ckpt.meta['metrics']['test']['logloss']:.4f}; "
             f"item-popularity baseline AUC {pop['auc']:.4f}, logloss {pop['logloss']:.4f}.", "",
             "| variant | AUC | Δ% vs eager | logloss | Δ% vs eager (+ = worse) | MB on disk | speed vs eager |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["eval"]
        if r["status"] != "ok" or "auc" not in e:
            lines.append(f"| {r['variant']} | {r['status']} {r['reason'][:60]} | | | | | |")
            continue
        d_auc = 100 * (e["auc"] - ref["auc"]) / ref["auc"]
        d_ll = 100 * (e["logloss"] - ref["logloss"]) / ref["logloss"]
        lines.append(f"| {r['variant']} | {e['auc']:.4f} | {d_auc:+.3f}% | {e['logloss']:.4f} | {d_ll:+.3f}% | "
                     f"{_mb(r['size_bytes'])} | {_fmt(r['speedup_vs_eager'], '.2f')}x |")
    return {"model": spec, "rows": rows, "eval_reference": ref, "popularity": pop,
            "finetune": ckpt.meta["metrics"], "markdown": lines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="bench-size")
    ap.add_argument("--models", default="dlrm:base,two-tower:base")
    ap.add_argument("--runtimes", default="onnxruntime,inductor")
    ap.add_argument("--ml-runtimes", default="eager,onnxruntime", help="runtimes for the MovieLens part")
    ap.add_argument("--part", default="size,overlap,movielens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=4,
                    help="fine-tuning epochs (best validation AUC kept; dlrm:base peaks at 2-4)")
    args = ap.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {"model": cpu_model(), "flags": reported_flags()}
    header = [
        "# graphopt size benchmark: Os (8-bit tables) and Oz (4-bit tables) vs fp32 O2", "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · {cpu['model'] or platform.processor()} · flags "
        f"{' '.join(cpu['flags'])} · {os.cpu_count()} cores · {args.threads} threads · load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} · torch {torch.__version__}", "",
        f"Command: `python benchmarks/bench_size.py -o {args.output} --models {args.models} --runtimes {args.runtimes} "
        f"--part {args.part} --threads {args.threads} --rounds {args.rounds}`", "",
    ]
    results: dict[str, Any] = {"machine": {"cpu": cpu, "load_average": os.getloadavg()}, "args": vars(args)}
    sections: list[str] = []
    for model in args.models.split(","):
        if "size" in args.part:
            res = size_part(model, args.runtimes.split(","), args, out)
            results.setdefault("size", []).append(res)
            sections += res["markdown"] + [""]
        if "overlap" in args.part:
            res = overlap_part(model)
            results.setdefault("overlap", []).append(res)
            sections += res["markdown"] + [""]
        if "movielens" in args.part:
            res = movielens_part(model, args.ml_runtimes.split(","), args, out)
            results.setdefault("movielens", []).append(res)
            sections += res["markdown"] + [""]
        (out / "size.md").write_text("\n".join(header + sections) + "\n")
        (out / "size.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("\n".join(header + sections))


if __name__ == "__main__":
    main()
