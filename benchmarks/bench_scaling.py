"""How graphopt's lead scales with the work: eager fp32, graphopt's best variant at
the fidelity bar and the best peer at the same bar, for bert4rec and bert-cls at
sizes base (4 layers, width 256) and large (BERT-base shaped: 12 layers, width
768), batch 1, 8, 32 and history (seq) 64 and 200.

    python benchmarks/bench_scaling.py -o bench-scaling                # the full table
    python benchmarks/bench_scaling.py --quick -o /tmp/scaling \\
        --models bert4rec --sizes base --batch-sizes 1,8 --seq-lens 64  # smoke run of a subset

One ``graphopt.bench`` run per (model, size) over every (batch, seq) point:
pipelines ``O2`` (fp32) and ``O2,cast{dtype=bf16}`` (and the int8 pipelines, fp32
form and int8-mixed-bf16, with ``--int8``) on ``--runtimes`` (default inductor), peers ``torch.compile``
(fp32 and bf16 autocast) and torchao's PT2E static int8, all timed interleaved
against eager. Large sizes get half the rounds (a point takes seconds there).
"Best" is ``BenchReport.best``: the fastest variant whose top-10 overlap with
eager fp32 is >= 0.99 (graphopt.fidelity_bar.FIDELITY_BAR; these runs have no eval
data); peers are held to the same bar. Writes ``OUT/scaling.md`` (the table,
machine, load, command), ``OUT/scaling.json`` (every row) and each run's
report in ``OUT/<model>_<size>/``.

Run time (estimate from a --quick subset on a loaded 2-core AMD EPYC): each
(model, size) run compiles one AOTInductor package per pipeline (base ~1 min,
large ~3-5 min each) and the torch.compile peers once per distinct shape; the
full table (4 runs x 6 points, 10 rounds) takes about 2.5-3 hours on an idle
2-core machine, most of it in the large runs at seq 200. Use --models/--sizes
to split it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import graphopt
from graphopt.bench import BenchReport, TimingConfig
from graphopt.fidelity_bar import FIDELITY_BAR

PEERS = ("torch.compile", "torch.compile-bf16", "torchao-pt2e-int8")
HEADER = ["model", "batch", "seq", "eager p50 ms", "best graphopt", "speedup", "top-10",
          "best peer", "speedup", "top-10", "graphopt / peer"]


def _row(report: BenchReport, shape: str, name: str | None) -> dict | None:
    return next((r for r in report.rows(shape) if r["variant"] == name), None) if name else None


def points(report: BenchReport) -> list[dict]:
    """One record per shape: eager, best graphopt, best peer (at the fidelity bar)."""
    out = []
    for shape in report.shapes:
        eager = next(r for r in report.rows(shape) if report.variant(r["variant"])["kind"] == "baseline")
        ours, peer = _row(report, shape, report.best(shape)), _row(report, shape, report.best(shape, kind="peer"))
        rec = {"model": report.model, "batch": eager["batch"], "seq": eager["seq"],
               "eager_p50_ms": eager.get("latency", {}).get("p50_ms")}
        for key, row in (("graphopt", ours), ("peer", peer)):
            rec[key] = None if row is None else {
                "variant": row["variant"], "speedup": row["speedup"]["speedup"],
                "topk_overlap": row.get("accuracy", {}).get("topk_overlap"), "p50_ms": row["latency"]["p50_ms"]}
        if ours and peer:
            rec["graphopt_over_peer"] = ours["speedup"]["speedup"] / peer["speedup"]["speedup"]
        out.append(rec)
    return out


def _cells(p: dict) -> list[str]:
    def side(d: dict | None) -> list[str]:
        if d is None:
            return ["none at the bar", "-", "-"]
        top = d["topk_overlap"]
        return [d["variant"], f"{d['speedup']:.2f}x", f"{top:.3f}" if top is not None else "-"]

    ratio = f"{p['graphopt_over_peer']:.2f}x" if "graphopt_over_peer" in p else "-"
    eager = f"{p['eager_p50_ms']:.2f}" if p["eager_p50_ms"] is not None else "-"
    return [p["model"], str(p["batch"]), str(p["seq"]), eager, *side(p["graphopt"]), *side(p["peer"]), ratio]


def markdown(records: list[dict], reports: list[BenchReport], command: str, wall_s: float) -> str:
    m = reports[0].machine if reports else {}
    loads = [max(r.machine.get("load_average") or [0.0]) for r in reports]
    lines = [
        "# Scaling: graphopt's best vs the best peer as the work grows", "",
        f"Measured {datetime.date.today().isoformat()} on {m.get('cpu')} ({m.get('cores')} cores, flags "
        f"{' '.join(m.get('cpu_flags', [])) or '-'}), {reports[0].config.get('threads') if reports else '?'} threads, "
        f"load average up to {max(loads, default=0.0):.1f}; torch {m.get('versions', {}).get('torch')}. "
        f"Wall time {wall_s / 60:.0f} min.", f"Command: `{command}`", "",
        "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
        *("| " + " | ".join(_cells(p)) + " |" for p in records), "",
        f"Best = fastest variant that keeps the ranking ({FIDELITY_BAR.describe()}); the peer is held to the same "
        "bar. Speedups are medians of per-round ratios against eager in the same run.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="bench-scaling")
    ap.add_argument("--models", default="bert4rec,bert-cls")
    ap.add_argument("--sizes", default="base,large")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--seq-lens", default="64,200")
    ap.add_argument("--runtimes", default="inductor")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--int8", action="store_true", help="also the default int8 pipelines (int8, int8-bf16)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=10, help="rounds at size base (large: half)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 4 rounds, no memory")
    args = ap.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pipelines = ["O2", "bf16=O2,cast{dtype=bf16}"] + (
        ["int8=O2,quantize-int8", "int8-bf16=O2,quantize-int8{mixed=bf16}"] if args.int8 else [])
    started = time.perf_counter()
    reports, records = [], []
    for model in args.models.split(","):
        for size in args.sizes.split(","):
            name = f"{model}:{size}"
            rounds = args.rounds if size == "base" else max(3, args.rounds // 2)
            timing = TimingConfig.quick() if args.quick else TimingConfig(warmup=2, rounds=rounds, max_calls=10)
            t0 = time.perf_counter()
            print(f"[{name}] bench (minutes)...", flush=True)
            report = graphopt.bench(
                name, pipelines, args.runtimes.split(","), peers=args.peers.split(",") if args.peers else False,
                batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                seq_lens=[int(s) for s in args.seq_lens.split(",")], threads=args.threads, timing=timing,
                memory=False, out_dir=out / name.replace(":", "_"), force=True,
            )
            reports.append(report)
            records += points(report)
            print(f"[{name}] done in {time.perf_counter() - t0:.0f}s", flush=True)
    command = ("python benchmarks/bench_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    text = markdown(records, reports, command, time.perf_counter() - started)
    (out / "scaling.md").write_text(text)
    (out / "scaling.json").write_text(json.dumps(
        {"command": command, "machine": reports[0].machine if reports else {}, "points": records}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
