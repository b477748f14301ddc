"""Which search strategy finds the best variant soonest? (graphopt tune's default)

Every candidate any strategy proposes is measured for real once (screen,
build, check, time: the same Evaluator ``graphopt tune`` uses) and stored in
a table (``--table``, reused across invocations); every strategy is then
replayed against that table on a simulated clock that charges each trial its
measured cost, under the real Budget rules (``graphopt.tune.replay``). So the
strategies differ only in what they try and when, never in timing noise.

    python benchmarks/tune_strategies.py --model bert4rec:tiny --runtimes eager,torchscript,onnxruntime \\
        --budgets 60,180 --seeds 0,1,2 --table tables/bert4rec-tiny.json -o strategies-bert4rec-tiny.md

Reported per strategy and budget: the best objective (speedup vs eager,
geometric mean over shapes) found within the budget, as a fraction of the
best any strategy found at the largest budget, and the simulated seconds it
took to reach 95% of that best (median over seeds; "-" = never).

Speed in the table is measured, by default, as the CPU time of the calling
thread per call with one thread everywhere (torch, ONNX Runtime): on a
shared machine wall-clock latencies of sub-millisecond models swing by
orders of magnitude, CPU time much less, and the comparison needs consistent
relative speeds, not latencies (``--wall`` measures wall-clock instead).
Costs (screen, compile, timing) are the wall seconds they took here, so the
simulated budgets are in this machine's seconds at the load it had.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from graphopt.bench.timing import TimingConfig, machine_info
from graphopt.tune.data import resolve_model, tune_data
from graphopt.tune.evaluate import Evaluator
from graphopt.tune.fidelity import Judge
from graphopt.tune.replay import Table, replay
from graphopt.tune.sensitivity import compute_sensitivity, ranking
from graphopt.tune.space import Candidate, build_space
from graphopt.tune.strategy import STRATEGIES


def _cpu_time_timing() -> None:
    """Time calls by the calling thread's CPU time, with one thread in torch and ONNX Runtime."""
    import graphopt.bench.timing as timing
    import graphopt.tune.evaluate as evaluate

    torch.set_num_threads(1)

    def time_call(fn):  # type: ignore[no-untyped-def]
        start = time.thread_time()
        fn()
        return time.thread_time() - start

    timing._time_call = time_call  # run_interleaved looks it up at call time
    options = evaluate.Evaluator.load_options

    def one_thread(self, cand):  # type: ignore[no-untyped-def]
        opts = options(self, cand)
        if cand.runtime == "onnxruntime":
            opts["intra_op_threads"] = opts["inter_op_threads"] = 1
        return opts

    evaluate.Evaluator.load_options = one_thread


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bert4rec:tiny")
    p.add_argument("--runtimes", default="eager,torchscript,onnxruntime")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--seq-lens", default="64")
    p.add_argument("--budgets", default="60,180", help="simulated budgets in seconds")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--table", required=True, help="JSON cache of measured trials (created or extended)")
    p.add_argument("-o", "--output", help="markdown result (default: stdout)")
    p.add_argument("--wall", action="store_true", help="time with the wall clock (default: thread CPU time, 1 thread)")
    args = p.parse_args(argv)
    if not args.wall:
        _cpu_time_timing()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tm = resolve_model(args.model)
    shapes = [(int(b), int(s) if "seq" in tm.program.dynamic_labels() else None)
              for b in args.batch_sizes.split(",") for s in args.seq_lens.split(",")]
    td = tune_data(tm, batch=max(b for b, _ in shapes))
    judge = Judge("topk-overlap", None, td, tm.reference())
    work = Path(tempfile.mkdtemp(prefix="tune-strategies-"))
    evaluator = Evaluator(tm, td, judge, shapes, "p50", TimingConfig(warmup=2, rounds=5, round_time_s=0.03, max_calls=8),
                          work)
    space = build_space(args.runtimes.split(","))
    table = Table.load(args.table)
    counter = [0]

    def measure(cand: Candidate, pipeline: str) -> dict:
        counter[0] += 1
        t = evaluator.run(cand, pipeline, counter[0], "bench")
        rec = {"status": t.status, "reason": t.reason, "objective": t.objective,
               "screen_s": evaluator.screens[pipeline].seconds, "compile_s": t.compile_s, "timing_s": t.timing_s,
               "fidelity": {"meets": bool(t.fidelity.get("meets")), "change_pct": t.fidelity.get("change_pct")},
               "fingerprint": t.fingerprint}
        if t.artifact:
            import shutil

            shutil.rmtree(t.artifact, ignore_errors=True)
        table.save(args.table)
        print(f"  measured {cand.key}: {t.status} {t.objective or ''}", file=sys.stderr, flush=True)
        return rec

    def measure_screen(cand: Candidate, pipeline: str) -> dict:
        s = evaluator.screen(cand, pipeline)
        rec = {"meets": s.meets, "seconds": s.seconds, "eager_ms": float("inf"), "fingerprint": s.fingerprint}
        if s.meets:
            gm = evaluator.program_for(cand, pipeline).gm
            inputs = list(evaluator.inputs.values())[-1]
            with torch.inference_mode():
                gm(*inputs)
                start = time.perf_counter()
                gm(*inputs)
            rec["eager_ms"] = 1e3 * (time.perf_counter() - start)
        table.save(args.table)
        return rec

    if not table.ranking:
        start = time.perf_counter()
        sens = compute_sensitivity(evaluator, tuple(space.fusions))
        table.ranking, table.ranking_s = ranking(sens), time.perf_counter() - start
        table.save(args.table)

    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = args.strategies.split(",")
    runs = {}
    for budget in budgets:
        for name in strategies:
            for seed in seeds if name != "greedy" else seeds[:1]:  # greedy uses no randomness
                print(f"{name} seed {seed} budget {budget:g}s", file=sys.stderr, flush=True)
                runs[name, seed, budget] = replay(name, table, space, seed, budget, measure=measure,
                                                  measure_screen=measure_screen)
    best_known = max((r["objective"] for r in table.trials.values() if r["status"] == "ok" and r["objective"]),
                     default=float("nan"))
    m = machine_info()
    lines = [
        f"# tune strategies: {tm.name}", "",
        f"`python benchmarks/tune_strategies.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"{m['cpu']} ({' '.join(m['cpu_flags'])}), {m['cores']} cores, load {', '.join(f'{x:.1f}' for x in m['load_average'])}; "
        f"{len(table.trials)} distinct candidates measured for real; best speedup any strategy found: {best_known:.2f}x "
        f"(runtimes {args.runtimes}; shapes {shapes}).", "",
        "| strategy | budget s | best found / best known | s to 95% of best known | trials |", "|---|---|---|---|---|",
    ]
    for budget in budgets:
        for name in strategies:
            ctxs = [runs[k] for k in runs if k[0] == name and k[2] == budget]
            fractions, reach, counts = [], [], []
            for ctx in ctxs:
                best = max((t.objective for t in ctx.trials() if t.ok), default=0.0)
                fractions.append(best / best_known)
                hit = next((t for t, b in ctx.trajectory if b == b and b >= 0.95 * best_known), None)
                reach.append(hit)
                counts.append(len(ctx.trials()))
            got = [r for r in reach if r is not None]
            reach_text = f"{statistics.median(got):.0f} ({len(got)}/{len(reach)} seeds)" if got else f"- (0/{len(reach)})"
            lines.append(f"| {name} | {budget:g} | {statistics.median(fractions):.3f} | {reach_text} | "
                         f"{statistics.median(counts):.0f} |")
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
