"""Incremental user state: one new event as a ``step`` on the cached window vs a full recompute.

    .venv/bin/python benchmarks/bench_incremental.py [--model gpt-rec:base] [--histories 64,200]
        [--batches 1,32] [--runtimes inductor,onnxruntime] [--pipeline O2] [--threads 2]
        [--rounds 9] [--replay 100] [--step-options K=V,...] [--out DIR [--reuse]] [--json FILE] [--quick]

Per history length W (also the window, ``max_history``) the model is derived into
prefill/step once and lowered with ``graphopt.lower_incremental`` to each runtime.
Per (W, batch): every user has W events; the new event is timed two ways, interleaved
in the same rounds (``graphopt.bench.timing``):

- ``full``: ``runner.prefill`` over the W + 1 events (a full recompute with the same
  sliding-window semantics; it also writes the state);
- ``step``: ``runner.step(new, state)`` on the state of the first W.

``ratio`` is the median over rounds of full / step (paired, same round); ``cpu_ratio`` the
same from process CPU time per call (meaningful with ``--threads 1`` on a loaded machine,
where wall-clock calls are preempted and weights evicted from cache). ``max_abs``
is the step's max abs difference from the eager float32 full recompute; ``state_bytes``
the state per user. Fidelity (eager, a replay of ``--replay`` steps past the window,
batch 8): bf16 and int8 state vs float32 state (max abs, mean top-10 overlap), and the
naive alternative, re-encoding only the last W events from scratch, vs the windowed
step (top-10 overlap); ``--replay 0`` skips it. ``--step-options max_autotune=true`` lowers
the step entry of the Inductor artifact with those options (``lower_incremental``'s
``step_options``; the other runtimes ignore it). ``--out DIR --reuse`` times artifacts
lowered by an earlier run (same model, pipeline and seed) instead of compiling again. Absolute milliseconds depend on the machine's load (recorded);
compare ratios. ONNX Runtime sessions do not spin idle threads (``spin=False``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import graphopt
from graphopt.bench.timing import TimingConfig, finish_report, paired_speedup, run_interleaved, summarize
from graphopt.metrics import topk_overlap
from graphopt.passlib.incremental import derive_incremental
from graphopt.rec.zoo import load_model


def _histories(batch: int, events: int, items: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, items + 1, (batch, events), generator=gen)


def _parse_options(text: str) -> dict:
    """``K=V,K=V`` as strings; ``lower_incremental`` coerces them to the options' types (and refuses unknown keys)."""
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--step-options: expected KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    return options


def _runner_options(runtime: str, threads: int) -> dict:
    if runtime == "onnxruntime":
        return {"intra_op_threads": threads, "spin": False}
    return {}


def _cpu_times(fns: dict, rounds: int, calls: int = 5) -> dict[str, float]:
    """Median process CPU time per call (ms), interleaved like the wall-clock rounds. With
    ``--threads 1`` it is the call's single-thread cost whatever else the machine runs
    (a loaded machine preempts calls; CPU time does not count the waiting)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls):
                start = time.process_time()
                fn()
                times[name].append(time.process_time() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def fidelity(program, inc_by_dtype, window: int, items: int, steps: int, batch: int = 8) -> list[dict]:
    """Eager replay: low-precision state vs float32 state, and naive re-encoding vs the window."""
    ids = _histories(batch, window, items, seed=11)
    new = _histories(batch, steps, items, seed=12)
    mask = torch.ones_like(ids)
    n = len(inc_by_dtype["native"].scores)
    scores = {}
    for dtype, inc in inc_by_dtype.items():
        out = inc.prefill(ids, mask)
        state, rows = out[n:], []
        for t in range(steps):
            out = inc.step(new[:, t:t + 1], *state)
            state = out[n:]
            rows.append(out[0])
        scores[dtype] = rows
    records = []
    exact = scores["native"]
    for dtype in inc_by_dtype:
        if dtype == "native":
            continue
        diffs = [float((a - b).abs().max()) for a, b in zip(exact, scores[dtype])]
        overlaps = [topk_overlap(b[:, 1:], a[:, 1:], k=10) for a, b in zip(exact, scores[dtype])]
        records.append({"history": window, "compare": f"{dtype} state vs float32 state", "steps": steps,
                        "max_abs": max(diffs), "top10_overlap": sum(overlaps) / len(overlaps),
                        "state_bytes": inc_by_dtype[dtype].state_bytes()})
    full = torch.cat([ids, new], 1)
    overlaps, diffs = [], []
    for t in range(steps):
        last = full[:, t + 1: t + 1 + window]  # the last W events after step t
        naive = program(last, torch.ones_like(last))[0]
        overlaps.append(topk_overlap(exact[t][:, 1:], naive[:, 1:], k=10))
        diffs.append(float((exact[t] - naive).abs().max()))
    records.append({"history": window, "compare": "re-encode last W events vs windowed step", "steps": steps,
                    "max_abs": max(diffs), "top10_overlap": sum(overlaps) / len(overlaps)})
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt-rec:base")
    ap.add_argument("--histories", default="64,200")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--runtimes", default="inductor,onnxruntime")
    ap.add_argument("--pipeline", default="O2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--replay", type=int, default=100)
    ap.add_argument("--out", default=None, help="keep the artifacts here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="load the artifacts already in --out instead of lowering")
    ap.add_argument("--json", default=None)
    ap.add_argument("--step-options", default="", help="Inductor step-entry lowering options, K=V[,K=V]")
    ap.add_argument("--quick", action="store_true", help="gpt-rec:tiny, histories 8,16, batches 1,4, 3 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.histories, args.batches, args.rounds, args.replay = "gpt-rec:tiny", "8,16", "1,4", 3, 20
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    histories = [int(x) for x in args.histories.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    runtimes = [r for r in args.runtimes.split(",") if r]
    step_options = {"inductor": _parse_options(args.step_options)}
    load_start = list(os.getloadavg())
    zm = load_model(args.model)
    items = int(zm.config["items"])
    # int8 pipelines calibrate on 8 batches of 8 seeded histories of the model's length (seeds 1000+)
    captured = zm.capture()
    calib = [tuple(zm.make_inputs(batch=8, seq=zm.seq, seed=1000 + i)[n] for n in captured.input_names) for i in range(8)]
    program, _ = graphopt.optimize(captured, args.pipeline, verify_each=False, calibration_data=calib) \
        if args.pipeline else (captured, None)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    config = TimingConfig(warmup=3, rounds=args.rounds, round_time_s=0.2, max_calls=20)
    rows, fid, compile_s = [], [], {}
    for window in histories:
        t0 = time.perf_counter()
        incs = {d: derive_incremental(program, window, d) for d in ("native", "bf16", "int8")}
        print(f"W={window}: derived in {time.perf_counter() - t0:.1f}s", flush=True)
        if args.replay:
            fid += fidelity(program, incs, window, items, args.replay)
            print(json.dumps(fid[-3:], indent=1), flush=True)
        runners = {}
        for runtime in runtimes:
            path = root / f"W{window}" / runtime
            if not (args.reuse and (path / "manifest.json").is_file()):
                t0 = time.perf_counter()
                graphopt.lower_incremental(incs["native"], runtime, path, force=True,
                                           step_options=step_options.get(runtime))
                compile_s[f"W{window}/{runtime}"] = time.perf_counter() - t0
                print(f"W={window}: lowered {runtime} in {compile_s[f'W{window}/{runtime}']:.1f}s", flush=True)
            runners[runtime] = graphopt.load(path, **_runner_options(runtime, args.threads)).activate()
        reference = incs["native"].prefill
        for batch in batches:
            ids = _histories(batch, window + 1, items, seed=window + batch)
            history, new = ids[:, :window], ids[:, window:]
            mask, full_mask = torch.ones_like(history), torch.ones_like(ids)
            want = reference(ids, full_mask)[0]
            fns, states = {}, {}
            for runtime, runner in runners.items():
                _, states[runtime] = runner.prefill(history, mask)
                fns[f"{runtime}/full"] = lambda r=runner, x=ids, m=full_mask: r.prefill(x, m)
                fns[f"{runtime}/step"] = lambda r=runner, x=new, s=states[runtime]: r.step(x, s)
            samples = run_interleaved(fns, config)
            cpu = _cpu_times(fns, args.rounds)
            for runtime, runner in runners.items():
                scores, _ = runner.step(new, states[runtime])
                full_s, step_s = summarize(samples[f"{runtime}/full"], batch), summarize(samples[f"{runtime}/step"],
                                                                                         batch)
                ratio = paired_speedup(samples[f"{runtime}/full"], samples[f"{runtime}/step"])
                row = {"runtime": runtime, "history": window, "batch": batch, "full_ms": full_s["p50_ms"],
                       "step_ms": step_s["p50_ms"], "ratio": ratio["speedup"], "ratio_p10": ratio["speedup_p10"],
                       "ratio_p90": ratio["speedup_p90"], "max_abs": float((scores - want).abs().max()),
                       "state_bytes": incs["native"].state_bytes(), "state_dtype": "float32",
                       "full_cpu_ms": cpu[f"{runtime}/full"], "step_cpu_ms": cpu[f"{runtime}/step"],
                       "cpu_ratio": cpu[f"{runtime}/full"] / cpu[f"{runtime}/step"]}
                rows.append(row)
                print(f"{runtime:12s} W={window:4d} batch={batch:3d} full {row['full_ms']:8.2f} ms  step "
                      f"{row['step_ms']:7.3f} ms  ratio {row['ratio']:6.1f}x (cpu time {row['cpu_ratio']:5.1f}x)  max_abs {row['max_abs']:.2e}  "
                      f"state {row['state_bytes']} B/user", flush=True)
        for runner in runners.values():
            runner.close()
    report = {"model": args.model, "pipeline": args.pipeline, "threads": args.threads, "rounds": args.rounds,
              "step_options": step_options, "lower_seconds": compile_s, "rows": rows, "fidelity": fid}
    finish_report(report, load_start, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
