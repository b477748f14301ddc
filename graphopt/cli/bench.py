"""``graphopt bench MODEL``: every (pipeline, runtime) variant and the peers
against eager fp32, interleaved in one run; writes report.json, report.md and
PNG plots, and ends with a table per batch size."""

from __future__ import annotations

import argparse
import sys

from graphopt.cli.argtypes import positive_int, positive_ints, runtime_list

__all__ = ["add_parser", "run", "print_tables"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    from graphopt.bench import DEFAULT_PIPELINES, DEFAULT_RUNTIMES, PEERS
    from graphopt.bench.pipelines import SIZE_PIPELINE

    p = sub.add_parser("bench", help="benchmark pipelines x runtimes (and peers) against eager fp32")
    p.add_argument("model", help="zoo name (bert4rec:base), saved Program (.pt2 or folder) or HF folder")
    p.add_argument("-p", "--pipeline", action="append", dest="pipelines", metavar="[LABEL=]PIPELINE",
                   help=f"pipeline to benchmark (repeatable; 'none' = unoptimized); default: {' '.join(DEFAULT_PIPELINES)}, "
                        f"plus {SIZE_PIPELINE} for embedding-dominated models (tables > half the parameter bytes); "
                        "bf16 and int8-bf16 left out on a CPU without bf16 GEMM kernels (AVX2 only)")
    p.add_argument("--runtimes", default=",".join(DEFAULT_RUNTIMES), type=runtime_list,
                   help="comma-separated runtimes (unavailable ones are reported as skipped)")
    p.add_argument("--peers", action="store_true", help="also measure every peer recipe (torch.compile, ONNX Runtime, "
                   "torchao; the bf16 ones left out on a CPU without bf16 GEMM kernels, AVX2 only)")
    p.add_argument("--peer", action="append", dest="peer_names", metavar="NAME", choices=PEERS,
                   help=f"measure this peer only (repeatable): {', '.join(PEERS)}")
    p.add_argument("--batch-sizes", default="1,32", type=positive_ints("--batch-sizes"))
    p.add_argument("--seq-lens", default="64", type=positive_ints("--seq-lens"),
                   help="sequence lengths (models with a dynamic 'seq' dim)")
    p.add_argument("--threads", type=positive_int, help="torch and runtime threads (default: torch's)")
    p.add_argument("-o", "--output", help="report folder (report.json, report.md, latency.png, tradeoff.png)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report folder")
    p.add_argument("--quick", action="store_true", help="1 warm-up call and 4 rounds: a smoke run, not a measurement")
    p.add_argument("--rounds", type=positive_int, help="interleaved timing rounds (default 15)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    p.add_argument("--keep-artifacts", action="store_true", help="copy the lowered artifacts into the report folder")
    p.add_argument("-k", type=positive_int, default=10, help="top-k for overlap and NDCG (default 10)")
    p.add_argument("--data", metavar="DATA",
                   help="with a fine-tuned checkpoint as MODEL: its data (ml-100k, a folder, or synthetic); variants "
                        "are timed and calibrated on real inputs and judged on HR@10/NDCG@10 of the test users "
                        "(AUC/logloss for CTR models), the int8 guard holds the validation users' metrics; "
                        "the sequence length is the checkpoint's")
    p.add_argument("--eval-users", type=positive_int, help="with --data: evaluate on the first N test users (default all)")
    p.set_defaults(run=run)


def print_tables(report, console=None) -> None:  # type: ignore[no-untyped-def]
    """One rich table per shape, best variant marked, then what was not measured."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    for shape in report.shapes:
        header, rows = report.table(shape)
        table = Table(title=escape(f"{report.model} · {shape}"), title_justify="left")
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
        best = report.best(shape)
        for row, raw in zip(rows, report.rows(shape)):
            status = raw.get("status")
            style = "bold green" if raw["variant"] == best else ("dim" if status != "ok" else None)
            table.add_row(*(escape(str(cell)) for cell in row), style=style)  # labels are not markup
        console.print(table)
        for name, status, why in report.not_measured(shape):
            console.print(f"  {name}: {status}: {why}", style="dim", markup=False, highlight=False)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    for n in report.notes:
        console.print(f"note: {n}", markup=False)
    console.print(report.ndcg_footnote(), style="dim", markup=False)


def _real_data(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    """``graphopt.cli.real_data.real_data_setup`` for a checkpoint MODEL and ``--data``."""
    from graphopt.cli.finetune import is_ctr, load_click_data, load_data
    from graphopt.cli.real_data import real_data_setup
    from graphopt.errors import ModelNotFoundError
    from graphopt.rec.finetune import is_checkpoint, load_checkpoint

    if not is_checkpoint(args.model):
        raise ModelNotFoundError(
            f"--data judges a fine-tuned checkpoint on its data, and {args.model} is not one; make one with "
            f"`graphopt finetune MODEL --data {args.data} -o DIR` and bench DIR")
    ckpt = load_checkpoint(args.model)
    data = load_click_data(args.data) if is_ctr(ckpt.name) else load_data(args.data)
    return real_data_setup(data, ckpt, max(args.batch_sizes), eval_users=args.eval_users, quick=args.quick)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from graphopt.bench import TimingConfig, bench
    from graphopt.bench.pipelines import parse_pipeline_spec
    from graphopt.transform.pipeline import parse_pipeline

    peers = list(args.peer_names) if args.peer_names else bool(args.peers)  # True: bench's default_peers
    if args.pipelines:  # explicit pipelines must parse before anything runs (exit 2)
        for spec in args.pipelines:
            text = parse_pipeline_spec(spec).text
            if text:
                parse_pipeline(text)
    timing = None
    if args.rounds:
        base = TimingConfig.quick() if args.quick else TimingConfig()
        timing = TimingConfig(base.warmup, args.rounds, base.round_time_s, base.max_calls)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]bench[/]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), TextColumn("{task.description}", markup=False), console=console, transient=True,
    ) as bar:
        task = bar.add_task("loading model", total=1)

        def progress(message: str, done: float, total: float) -> None:
            bar.update(task, completed=done, total=total, description=message)

        model, seq_lens, real = args.model, args.seq_lens, {}
        if args.data:
            bar.update(task, description=f"loading {args.data}")
            setup = _real_data(args)
            model, seq_lens = setup["zoo"], [setup["seq"]] if setup["seq"] else args.seq_lens
            real = {"eval_data": setup["eval"], "validation_data": setup.get("validation"),
                    "calibration_data": setup["calibration"]}
        report = bench(
            model, args.pipelines, args.runtimes,
            peers=peers, batch_sizes=args.batch_sizes, seq_lens=seq_lens, threads=args.threads,
            out_dir=args.output, force=args.force, quick=args.quick, timing=timing,
            k=args.k, memory=not args.no_memory, keep_artifacts=args.keep_artifacts, progress=progress, **real,
        )
    print_tables(report, Console() if sys.stdout.isatty() else Console(width=160))
    if args.output:
        print(f"report: {args.output}/report.md (report.json, latency.png, tradeoff.png)")
    ok = [v for v in report.variants if v["status"] == "ok" and v["kind"] != "baseline"]
    return 0 if ok or not [v for v in report.variants if v["kind"] != "baseline"] else 1
