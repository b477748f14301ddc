"""What moving an Inductor package's weights onto 64-byte boundaries buys on this CPU.

    python benchmarks/bench_constant_alignment.py [--models bert4rec:base,bert4rec:large]
        [--pipelines "O2;O2,cast{dtype=bf16};O2,quantize-int8{mixed=bf16}"] [--batch-sizes 1,32]
        [--seq 64] [--instances 2] [--rounds 8] [--threads 2] [--lower K=V[,K=V]] [--work DIR]
        [--json out.json]

AOTInductor copies a CPU package's constants into one ``malloc``'d block, 16 bytes off a
cache line (``runtimes/inductor_constants.py``); ``graphopt.load`` moves them onto 64-byte
boundaries unless ``align_constants=False``. Per (model, pipeline) the Program is optimized
(int8 pipelines calibrated on ``graphopt bench``'s own batches, the guard on) and lowered once
with the inductor runtime's defaults (``--lower max_autotune=false`` and the like override
them); then ``--instances`` runners of the one artifact with
the constants aligned and as many as the loader places them run interleaved: ``--rounds``
rounds, the order rotated every round, one untimed call then the median of a few timed calls
per runner and round. The table gives each side's median p50 (the median over its instances),
their ratio, the spread between instances, how many as-loaded instances had constants off a
cache line, whether every output is bit for bit the same, and what moved (constants, MB, in
how many aligned instances: one whose block fell on a cache line moves nothing). Ratios come from one interleaved run; instances of one artifact
differ by up to ~15% at base size as loaded (where their block happens to fall), hence more
than one.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import graphopt
from graphopt.bench.calibration import bench_calibration
from graphopt.bench.timing import machine_info, rotated_medians
from graphopt.rec.zoo import load_model


def measure(model: str, pipeline: str, batches: list[int], seq: int, instances: int, rounds: int,
            work: Path, lower: dict[str, str]) -> list[dict]:
    zm = load_model(model)
    program = zm.capture()
    name = f"{model}-{pipeline}-{'-'.join(f'{k}={v}' for k, v in lower.items())}"
    folder = work / name.replace(":", "_").replace(",", "_").replace("{", "").replace("}", "").replace(" ", "_")
    if not (folder / "manifest.json").is_file():  # --work keeps the artifacts between runs
        calibration = {}
        if "quantize" in pipeline:
            held, _ = bench_calibration(
                lambda b, s, seed: tuple(zm.make_inputs(batch=b, seq=s, seed=seed)[n] for n in program.input_names),
                [(b, seq) for b in batches])
            calibration = {"calibration_data": held}
        optimized, _ = graphopt.optimize(program, pipeline, verify_each=False, **calibration)
        start = time.perf_counter()
        graphopt.lower(optimized, "inductor", folder, **{"device": "cpu", "threads": torch.get_num_threads(), **lower})
        print(f"  {model} {pipeline}: lowered in {time.perf_counter() - start:.0f} s", flush=True)
    runners, placements = {}, {}
    for i in range(instances):
        for on in (True, False):
            runner = graphopt.load(folder, align_constants=on)
            runner.activate()
            name = f"{'aligned' if on else 'as-loaded'}{i}"
            runners[name], placements[name] = runner, runner.constant_placement[0]
    rows = []
    for batch in batches:
        x = tuple(zm.make_inputs(batch=batch, seq=seq, seed=0).values())
        outs = {n: r(*x)[0] for n, r in runners.items()}
        first = next(iter(outs.values()))
        p50 = {n: t * 1e3 for n, t in rotated_medians({n: functools.partial(r, *x) for n, r in runners.items()},
                                                        rounds, 5 if batch <= 8 else 3).items()}
        side = {s: [v for n, v in p50.items() if n.startswith(s)] for s in ("aligned", "as-loaded")}
        med = {s: statistics.median(v) for s, v in side.items()}
        rows.append({"model": model, "pipeline": pipeline, "batch": batch, "seq": seq,
                     "aligned_ms": med["aligned"], "as_loaded_ms": med["as-loaded"],
                     "speedup": med["as-loaded"] / med["aligned"],
                     "aligned_range_ms": [min(side["aligned"]), max(side["aligned"])],
                     "as_loaded_range_ms": [min(side["as-loaded"]), max(side["as-loaded"])],
                     "bit_equal": all(torch.equal(o, first) for o in outs.values()),
                     "p50_ms": p50, "placements": placements})
        print(f"  {model} {pipeline} batch {batch}: aligned {med['aligned']:.2f} ms, as loaded "
              f"{med['as-loaded']:.2f} ms ({rows[-1]['speedup']:.2f}x)", flush=True)
    for runner in runners.values():
        runner.deactivate()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | pipeline | batch | aligned p50 ms | as loaded p50 ms | speedup | instances (aligned / as loaded) "
             "| as loaded off a cache line | bit-equal | moved |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pl = r["placements"]
        off = [n for n, p in pl.items() if n.startswith("as-loaded") and isinstance(p, dict) and p["misaligned"]]
        moving = [p for n, p in pl.items() if n.startswith("aligned") and isinstance(p, dict) and p["moved"]]
        loaded = sum(n.startswith("as-loaded") for n in pl)
        moved = (f"{moving[0]['moved']} of {moving[0]['moved'] + moving[0]['kept']} "
                 f"({moving[0]['moved_bytes'] / 2**20:.1f} MB) in {len(moving)} of {loaded}" if moving else "none")
        lines.append(f"| {r['model']} | `{r['pipeline']}` | {r['batch']} | {r['aligned_ms']:.2f} | "
                     f"{r['as_loaded_ms']:.2f} | **{r['speedup']:.2f}x** | "
                     f"{r['aligned_range_ms'][0]:.2f}-{r['aligned_range_ms'][1]:.2f} / "
                     f"{r['as_loaded_range_ms'][0]:.2f}-{r['as_loaded_range_ms'][1]:.2f} | "
                     f"{len(off)} of {loaded} | {'yes' if r['bit_equal'] else 'NO'} | {moved} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert4rec:base,bert4rec:large")
    ap.add_argument("--pipelines", default="O2;O2,cast{dtype=bf16};O2,quantize-int8{mixed=bf16}",
                    help="';'-separated (int8 pipelines on a large model run the guard: tens of minutes)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lower", default="", help="inductor lowering options K=V[,K=V] (default: its defaults)")
    ap.add_argument("--work", help="keep the artifacts here and reuse them (default: a temporary folder)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lower = dict(kv.split("=", 1) for kv in args.lower.split(",") if kv)
    started, rows = time.time(), []
    with tempfile.TemporaryDirectory(prefix="graphopt-align-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        for model in args.models.split(","):
            for pipeline in args.pipelines.split(";"):
                rows += measure(model, pipeline, [int(b) for b in args.batch_sizes.split(",")], args.seq,
                                args.instances, args.rounds, work, lower)
    cpu = machine_info()
    head = (f"`python benchmarks/bench_constant_alignment.py {' '.join(sys.argv[1:])}`, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, {time.time() - started:.0f} s. CPU: {cpu['cpu']} "
            f"({', '.join(cpu['cpu_flags'])}); torch {torch.__version__}; {args.threads} threads, seq {args.seq}.\n\n")
    print("\n" + head + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "argv": sys.argv[1:], "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
