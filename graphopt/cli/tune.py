"""``graphopt tune MODEL -o OUT``: search pipelines x runtimes x options for the fastest
artifact that keeps the ranking, within a time budget; ``OUT/best`` holds the best so far."""

from __future__ import annotations

import argparse
import math
import sys

from graphopt.cli.argtypes import positive_int, positive_ints
from graphopt.errors import PipelineParseError

__all__ = ["add_parser", "run"]


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{what}: ratios must lie in (0, 1), got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    from graphopt.tune.data import DATASETS
    from graphopt.tune.evaluate import OBJECTIVES
    from graphopt.tune.fidelity import METRICS
    from graphopt.tune.strategy import STRATEGIES

    p = sub.add_parser("tune", help="search for the fastest artifact that keeps the ranking, within a time budget")
    p.add_argument("model", help="zoo name, saved Program, fine-tuned checkpoint or HF folder (as `graphopt optimize`)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", choices=DATASETS, help="evaluation data: NDCG@10/HR@10 on MovieLens-100K test users")
    data.add_argument("--calib", metavar="FILE", help="calibration batches (torch.save'd list of input dicts); "
                      "the last quarter is held out for screening")
    p.add_argument("--metric", choices=list(METRICS),
                   help="fidelity metric (default ndcg@10 with --data, else topk-overlap)")
    p.add_argument("--max-drop", default=None, metavar="PCT",
                   help="largest allowed drop, e.g. 0.5%% (default: the project's bar, 0.5%% NDCG/HR, top-10 >= 0.99)")
    p.add_argument("--budget", default="10m", help="wall-clock budget: seconds or 90s / 10m / 1h (default 10m)")
    p.add_argument("--batch-sizes", default="1,32", type=positive_ints("--batch-sizes"))
    p.add_argument("--seq-lens", default="64", type=positive_ints("--seq-lens"))
    p.add_argument("--runtimes", help="comma-separated runtimes to search (default: every available one)")
    p.add_argument("--objective", choices=OBJECTIVES, default="p50",
                   help="p50/p99 latency ratio vs eager (geometric mean over shapes) or throughput at the largest batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the search order and the data draws")
    p.add_argument("--strategy", choices=list(STRATEGIES), default="greedy", help="search strategy (default greedy)")
    p.add_argument("--prune", type=lambda t: _floats(t, "--prune"), default=(), metavar="RATIOS",
                   help="also try prune-ffn/prune-heads at these ratios, with distillation recovery (e.g. 0.1,0.2)")
    p.add_argument("--threads", type=positive_int, help="torch and runtime threads for every candidate (default: torch's)")
    p.add_argument("--max-trials", type=positive_int, metavar="N", help="stop after N new trials (the budget still applies)")
    p.add_argument("-o", "--output", required=True, help="output folder (best/, trials.jsonl, report.md, pareto.png)")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue OUT from its trials.jsonl")
    state.add_argument("--force", action="store_true", help="start over in an OUT graphopt wrote (never a user's folder)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from graphopt.tune import tune
    from graphopt.tune.budget import parse_budget
    from graphopt.tune.fidelity import parse_drop

    seconds = parse_budget(args.budget)  # usage errors before any model is loaded
    if args.max_drop is not None:
        parse_drop(args.max_drop)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()] if args.runtimes else None
    if runtimes is not None and not runtimes:
        raise PipelineParseError("--runtimes: name at least one runtime (`graphopt runtimes` lists them)")
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]tune[/]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
        TextColumn("{task.fields[best]}", markup=False), TextColumn("{task.description}", markup=False), console=console, transient=True,
    )
    task = None

    def progress(p) -> None:  # type: ignore[no-untyped-def]
        nonlocal task
        if task is None:  # started by the first event: errors before it stay one clean line
            bar.start()
            task = bar.add_task("", total=seconds, best="")
        best = f"best {p.best_speedup:.2f}x" if p.best_speedup else ""
        bar.update(task, completed=min(p.elapsed_s, p.budget_s), description=p.message[:90], best=best)
        if p.message.startswith("note") and console.is_terminal:
            bar.console.print(p.message, markup=False, highlight=False)  # stays above the bar
        elif not console.is_terminal and p.message.startswith(("trial", "done", "confirming", "computing", "note")):
            print(f"[{p.elapsed_s:5.0f}s] {p.message}", file=sys.stderr, flush=True)

    try:
        result = tune(
            args.model, args.output, data=args.data, calib=args.calib, metric=args.metric, max_drop=args.max_drop,
            budget=seconds, batch_sizes=args.batch_sizes, seq_lens=args.seq_lens, runtimes=runtimes,
            objective=args.objective, seed=args.seed, strategy=args.strategy, prune_ratios=args.prune,
            max_trials=args.max_trials, threads=args.threads, resume=args.resume, force=args.force, progress=progress,
        )
    finally:
        if task is not None:
            bar.stop()
    return _summary(result)


def _summary(result) -> int:  # type: ignore[no-untyped-def]
    """Print the closing summary; the exit code: 1 when no requested variant worked."""
    from graphopt.tune.report import users_text

    best = result.best_trial
    trials = result.trials
    statuses: dict[str, int] = {}
    for t in trials:
        statuses[t.status] = statuses.get(t.status, 0) + 1
    print(f"{len(trials)} trials in {result.wall_s:.0f}s (" + ", ".join(f"{v} {k}" for k, v in sorted(statuses.items())) + ")")
    if best is None:
        print("no candidate met the bar")
        return 1
    requested = result.settings.get("runtimes") or []
    if requested and best.candidate.runtime not in requested:  # only the eager reference worked
        print(f"no requested variant worked: no candidate on {', '.join(requested)} ran and met the bar "
              f"(failed, below the bar or not started: see {result.out_dir}/report.md); {result.out_dir}/best "
              "holds only eager's reference, which was not requested")
        return 1
    conf = {r["n"]: r for r in result.confirmation.get("finalists", [])}
    lat = conf.get(best.n, {}).get("latency") or best.latency
    speeds = ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in lat.items())
    fid = best.runtime_fidelity or best.fidelity
    if fid.get("metric") in ("topk_overlap", "cosine"):
        quality = f"{fid['metric'].replace('_', '-')} {fid['value']:.4f}"
    else:
        refs = fid.get("reference_values", {})
        quality = ", ".join(f"{k.upper()} {v:.4f} (eager {refs.get(k, math.nan):.4f})" for k, v in fid.get("values", {}).items())
        quality += users_text(fid.get("users"))
    print(f"best: {best.key}\n  speedup vs eager: {speeds}\n  {quality}")
    if lat and all(v["speedup"] < 1.0 for v in lat.values()):
        print("  nothing here beat eager: the best found is slower than the model as it is (serve it unchanged, or "
              "search longer / more runtimes)")
    defaults = [r for r in conf.values() if r["default"]]
    if defaults and best.n in conf:
        top = max(defaults, key=lambda r: r["objective"] or 0)
        print(f"  vs best default ({top['key']}): {conf[best.n]['objective'] / top['objective']:.2f}x (same run)")
    print(f"artifact: {result.out_dir}/best   report: {result.out_dir}/report.md")
    return 0
