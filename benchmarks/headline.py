"""The README's headline table: graphopt's best variant and the strongest peer
against eager fp32, for bert4rec:base, bert-cls:base and dlrm:base at batch 1
and 32 (seq 64), default pipelines (fp32 O2, bf16, int8) on every runtime,
all peer recipes, one interleaved run per model.

    python benchmarks/headline.py                 # full run (tens of minutes on 2 cores)
    python benchmarks/headline.py --quick         # smoke run: few rounds, same table
    python benchmarks/headline.py -o out/headline --threads 1 --models dlrm:base

Writes ``OUT/<model>/`` (report.json, report.md, PNGs) per model and
``OUT/headline.md`` (the table below, with date, machine and versions), and
prints the table. "best" = the fastest variant that keeps the ranking
(graphopt.fidelity_bar.FIDELITY_BAR: top-10 overlap with eager >= 0.99 here, no
eval data; graphopt.bench.report); speedups are medians of
ratios measured round by round in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import graphopt
from graphopt.bench import BenchReport, TimingConfig
from graphopt.fidelity_bar import FIDELITY_BAR
from graphopt.process import quiet_third_party

MODELS = ("bert4rec:base", "bert-cls:base", "dlrm:base")


def _fmt(report: BenchReport, shape: str, name: str | None) -> tuple[str, str, str]:
    if name is None:
        return "-", "-", "-"
    row = next(r for r in report.rows(shape) if r["variant"] == name)
    overlap = row.get("accuracy", {}).get("topk_overlap")
    return name, f"{row['speedup']['speedup']:.2f}x", f"{overlap:.3f}" if overlap is not None else "-"


def _best_of(report: BenchReport, shape: str, kind: str) -> str | None:
    rows = [
        r for r in report.rows(shape)
        if r.get("status") == "ok" and report.variant(r["variant"])["kind"] == kind and report.acceptable(r)
    ]
    return max(rows, key=lambda r: r["speedup"]["speedup"])["variant"] if rows else None


def headline_rows(report: BenchReport) -> list[list[str]]:
    out = []
    for shape in report.shapes:
        eager = next(r for r in report.rows(shape) if report.variant(r["variant"])["kind"] == "baseline")
        ours, peer = _best_of(report, shape, "graphopt"), _best_of(report, shape, "peer")
        o, p = _fmt(report, shape, ours), _fmt(report, shape, peer)
        vs = "-"
        if ours:
            ro = next(r for r in report.rows(shape) if r["variant"] == ours)["speedup"]["speedup"]
            rp = next(r for r in report.rows(shape) if r["variant"] == peer)["speedup"]["speedup"] if peer else 0.0
            # plain eager is the strongest "peer" where every peer at the bar is slower than it
            vs = f"{ro / rp:.2f}x" if rp >= 1.0 else f"{ro:.2f}x (vs eager)"
        batch = str(eager["batch"])
        out.append([report.model, batch, f"{eager['latency']['p50_ms']:.2f}", *o, *p, vs])
    return out


HEADER = ["model", "batch", "eager p50 ms", "best graphopt variant", "speedup", "top-10",
          "strongest peer", "speedup", "top-10", "graphopt / peer"]


def markdown(rows: list[list[str]], reports: list[BenchReport], command: str) -> str:
    m = reports[0].machine if reports else {}
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {m.get('cpu')} ({m.get('cores')} cores, "
        f"flags {' '.join(m.get('cpu_flags', [])) or '-'}, "
        f"{reports[0].config.get('threads') if reports else '?'} threads, device {m.get('device')}); {versions}.",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        f"Best = fastest variant that keeps the ranking ({FIDELITY_BAR.describe()}); peers held to the same bar. "
        "Speedup = median over "
        "interleaved rounds of eager's time / the variant's, same run, same inputs. Full tables (every "
        "variant, p99, size, compile time, memory, skipped/failed with reasons): OUT/<model>/report.md.",
    ]
    loaded = [r.model for r in reports if r.warnings]
    if loaded:
        peak = max(max(r.machine.get("load_average") or [0.0]) for r in reports)
        lines += [f"\n> The machine was loaded while measuring {', '.join(loaded)} (load average up to "
                  f"{peak:.1f} on {m.get('cores')} cores): absolute latencies are inflated; the paired ratios hold."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()  # as the graphopt command does: no third-party warnings between the progress lines
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="bench-headline", help="output folder (default ./bench-headline)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch/runtime threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds per shape")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 4 rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    timing = TimingConfig.quick() if args.quick else TimingConfig(warmup=3, rounds=args.rounds, round_time_s=0.05, max_calls=10)
    reports, rows = [], []
    for model in args.models.split(","):
        start = time.perf_counter()
        print(f"[{model}] optimizing, lowering and timing (this takes minutes)...", flush=True)

        def progress(message: str, done: float, total: float, model: str = model, start: float = start) -> None:
            if message.startswith(("built", "b")) and "round" not in message:
                print(f"  [{model} {time.perf_counter() - start:5.0f}s {done:.0f}/{total:.0f}] {message}", flush=True)

        report = graphopt.bench(
            model, batch_sizes=[int(b) for b in args.batch_sizes.split(",")], seq_lens=[args.seq_len],
            peers=True, threads=args.threads, timing=timing, memory=not args.no_memory,
            out_dir=out / model.replace(":", "_"), force=True, progress=progress,
        )
        reports.append(report)
        rows += headline_rows(report)
        print(f"[{model}] done in {time.perf_counter() - start:.0f}s: {out / model.replace(':', '_')}/report.md", flush=True)
    command = "python benchmarks/headline.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(rows, reports, command.strip())
    (out / "headline.md").write_text(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
