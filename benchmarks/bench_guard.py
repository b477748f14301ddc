"""What the int8 accuracy guard costs, and what sharing the float prefix in its ranking saves.

    .venv/bin/python benchmarks/bench_guard.py [--model bert4rec:large]
        [--pipeline 'O2,quantize-int8{mixed=bf16}'] [--seq 64] [--threads 2]
        [--ways shared,per-layer] [--json FILE]

Runs ``graphopt.optimize`` with the pipeline on the bench's calibration batches (the
default 16 x 32 rows, seeds 1000+, at ``--seq``; the guard holds out the last quarter)
once per way of ranking the layers, in turn in one process:

- ``shared``: the guard's ranking as it is (``Emulator.each_alone``: one float pass,
  then each layer's pass from that layer on);
- ``per-layer``: one whole held-out pass per layer (the ranking before 2026-12-05).

Both give the same scores, so the same decision: the script checks that the pass's
notes (which layers stay float, every score) are identical and prints the wall time of
each whole pipeline (capture excluded). Compare the times within one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings

import torch

import graphopt
import graphopt.passlib.accuracy_guard as accuracy_guard
from graphopt.passlib.calibration import DEFAULT_CALIBRATION_BATCH, DEFAULT_CALIBRATION_BATCHES
from graphopt.rec.zoo import load_model

WAYS = ("shared", "per-layer")


def _per_layer(emu, names, holdout, refs, target):  # type: ignore[no-untyped-def]
    return {name: accuracy_guard._damage(emu, {name}, holdout, refs, target) for name in names}


def run(model: str, pipeline: str, seq: int, way: str) -> dict:
    zm = load_model(model)
    program = zm.capture()
    calibration = [tuple(zm.make_inputs(batch=DEFAULT_CALIBRATION_BATCH, seq=seq, seed=1000 + i).values())
                   for i in range(DEFAULT_CALIBRATION_BATCHES)]
    shared = accuracy_guard._damage_alone
    if way == "per-layer":
        accuracy_guard._damage_alone = _per_layer
    try:
        start = time.perf_counter()
        _, report = graphopt.optimize(program, pipeline, calibration_data=calibration, verify_each=False)
        seconds = time.perf_counter() - start
    finally:
        accuracy_guard._damage_alone = shared
    notes = [note for p in report.passes if p.name.startswith("quantize") for note in p.notes]
    return {"way": way, "seconds": round(seconds, 1), "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bert4rec:large")
    ap.add_argument("--pipeline", default="O2,quantize-int8{mixed=bf16}")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    ways = [w for w in args.ways.split(",") if w]
    if unknown := [w for w in ways if w not in WAYS]:
        raise SystemExit(f"--ways: unknown {unknown[0]!r}; choose from {', '.join(WAYS)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    results = []
    for way in ways:
        results.append(run(args.model, args.pipeline, args.seq, way))
        print(f"{way:>9}: {results[-1]['seconds']:.1f} s", flush=True)
    for note in results[0]["notes"]:
        print("  " + note)
    same = all(r["notes"] == results[0]["notes"] for r in results)
    if len(results) > 1:
        print(f"same decision and scores: {same}; {results[1]['way']} / {results[0]['way']}: "
              f"{results[1]['seconds'] / results[0]['seconds']:.2f}x")
    if args.json:
        out = {"model": args.model, "pipeline": args.pipeline, "seq": args.seq, "threads": args.threads,
               "load": list(os.getloadavg()), "torch": torch.__version__, "same": same, "results": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if not same:
        raise SystemExit("the two rankings decided differently: a bug (they compute the same scores)")


if __name__ == "__main__":
    main()
