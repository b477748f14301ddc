"""Which Inductor settings pay on this CPU: freezing, max-autotune with the CPP
GEMM template, concat-linear, and the thread count the kernels are compiled for.

    python benchmarks/bench_inductor_settings.py [--models bert4rec:base,bert-cls:base]
        [--precisions fp32,bf16,int8-bf16]
        [--settings default,no-freezing,autotune,no-autotune,concat-linear,threads-2]
        [--batch-sizes 1,32] [--seq 64] [--threads 1] [--rounds 10] [-o out.md]

Per (model, precision) the Program (``O2``, ``O2,cast{dtype=bf16}`` or
``O2,quantize-int8{mixed=bf16}`` calibrated, accuracy guard on, on the batches
``graphopt bench`` calibrates on at that seq, so the int8 plan is the bench's) is lowered
once per setting with ``graphopt.lower(program, "inductor", ...)``; compile time
is the lowering's wall time. ``autotune-cpp`` / ``autotune-aten`` autotune with
one GEMM backend only (Inductor's CPP template / ATen's oneDNN and MKL calls);
``SETTING@N`` compiles SETTING once more, as its N-th package: max-autotune picks
each GEMM's kernel by timing it at compile time, so two compiles of one Program can
differ, and this measures by how much. The ``GEMMs`` column is what each package
runs, read from its generated code (``graphopt.runtimes.inductor_code.gemm_census``):
oneDNN/ATen calls, CPP template kernels on AMX tiles, other CPP template kernels. Then the settings run interleaved at each batch
size: ``--rounds`` rounds, the order rotated every round, each setting's thread
count set and one untimed call made before its timed calls (switching thread
counts slows the first call after the switch), median of the round medians.
The table gives p50 ms and the ratio to ``default`` (freezing on, ``max_autotune``
decided per Program: on for base-size models on CPU, concat-linear off) of the same
model, precision and batch; ``autotune`` / ``no-autotune`` force it either way. ``threads-N`` compiles for N
threads and runs with ``torch.set_num_threads(N)``; every other setting uses
``--threads``. On a machine loaded past its core count, more threads than free
cores only measure OpenMP's barrier waits: read threads-N on an idle machine. Writes a markdown table (and ``.json``
beside it) with the CPU model, flags, load average and versions.

A full run (2 models x 2 precisions x 5 settings = 20 AOTInductor compiles, the
autotuned ones slowest) takes about an hour on a loaded 2-core EPYC; on an idle
one about 20 minutes.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import graphopt
from graphopt.bench.calibration import bench_calibration
from graphopt.bench.timing import machine_info, rotated_medians
from graphopt.rec.zoo import load_model

PRECISIONS = {"fp32": "O2", "bf16": "O2,cast{dtype=bf16}", "int8-bf16": "O2,quantize-int8{mixed=bf16}"}
SETTINGS = {
    "default": {},  # max_autotune decided per Program (on for base-size models on CPU)
    "no-freezing": {"freezing": False},
    "autotune": {"max_autotune": True, "gemm_backends": "CPP,ATEN"},
    "autotune-cpp": {"max_autotune": True, "gemm_backends": "CPP"},
    "autotune-aten": {"max_autotune": True, "gemm_backends": "ATEN"},
    "no-autotune": {"max_autotune": False},
    "concat-linear": {"concat_linear": True},
    "threads-2": {"threads": 2},
}


def _threads(setting: str, default: int) -> int:
    return int(setting.split("-")[1].split("@")[0]) if setting.startswith("threads-") else default


def _options(setting: str) -> dict:
    """The lowering options of a setting; ``SETTING@N`` is SETTING compiled once more."""
    name = setting.split("@")[0]
    if name not in SETTINGS and not name.startswith("threads-"):
        raise SystemExit(f"unknown setting {setting!r}: pick from {', '.join(SETTINGS)}, threads-N, SETTING@N")
    return SETTINGS.get(name, {})


def _gemms(folder: Path) -> str:
    """``oneDNN n / AMX template n / template n`` of the artifact's package(s)."""
    from graphopt.runtimes.inductor_code import gemm_census

    counts = sum((gemm_census(pt2) for pt2 in sorted(folder.glob("*.pt2"))), collections.Counter())
    return f"{counts['onednn']} / {counts['template-amx']} / {counts['template']}"


def measure(model: str, precision: str, settings: list[str], batches: list[int], seq: int, threads: int,
            rounds: int, work: Path) -> list[dict]:
    zm = load_model(model)
    captured = zm.capture()
    pipeline = PRECISIONS[precision]
    calibration = {}
    if "quantize" in pipeline:  # the bench's own held-out batches: its int8 plan, not another one
        held, _ = bench_calibration(
            lambda b, s, seed: tuple(zm.make_inputs(batch=b, seq=s, seed=seed)[n] for n in captured.input_names),
            [(b, seq) for b in batches])
        calibration = {"calibration_data": held}
    program, _ = graphopt.optimize(captured, pipeline, verify_each=False, **calibration)
    runners, rows = {}, []
    for setting in settings:
        n = _threads(setting, threads)
        torch.set_num_threads(n)
        options = {**_options(setting), "threads": n, "device": "cpu"}
        folder = work / f"{model}-{precision}-{setting}".replace(":", "_")
        compile_s, timing = None, folder.with_name(folder.name + ".compile_s")  # beside: load checks the folder
        if not (folder / "manifest.json").is_file():  # --work keeps packages between runs
            start = time.perf_counter()
            try:
                graphopt.lower(program, "inductor", folder, **options)
            except Exception as e:  # noqa: BLE001 - a setting that does not compile is a row with the reason
                rows.append({"model": model, "precision": precision, "setting": setting, "error": str(e)[:200]})
                continue
            compile_s = time.perf_counter() - start
            timing.write_text(f"{compile_s}\n")
        compile_s = compile_s or float(timing.read_text())
        runner = graphopt.load(folder)
        runner.activate()
        runners[setting] = (runner, n, compile_s, _gemms(folder))
        print(f"  {model} {precision} {setting}: compiled in {compile_s:.0f}s, GEMMs {runners[setting][3]}",
              flush=True)
    for batch in batches:
        x = tuple(zm.make_inputs(batch=batch, seq=seq, seed=0).values())
        calls = 5 if batch <= 8 else 2
        p50 = {s: t * 1e3 for s, t in rotated_medians(
            {s: functools.partial(r[0], *x) for s, r in runners.items()}, rounds, calls,
            before=lambda s: torch.set_num_threads(runners[s][1])).items()}
        base = p50.get("default")
        for s, (_, n, compile_s, gemms) in runners.items():
            rows.append({"model": model, "precision": precision, "setting": s, "batch": batch, "threads": n,
                         "p50_ms": p50[s], "vs_default": (base / p50[s]) if base else None, "compile_s": compile_s,
                         "gemms": gemms})
    for runner, *_ in runners.values():
        runner.deactivate()
    torch.set_num_threads(threads)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | precision | setting | threads | batch | p50 ms | speedup vs default | compile s | "
             "GEMMs oneDNN / AMX template / template |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['setting']} | - | - | failed: {r['error']} | - | - | - |")
            continue
        ratio = f"{r['vs_default']:.2f}x" if r["vs_default"] else "-"
        lines.append(f"| {r['model']} | {r['precision']} | {r['setting']} | {r['threads']} | {r['batch']} | "
                     f"{r['p50_ms']:.2f} | {ratio} | {r['compile_s']:.0f} | {r['gemms']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert4rec:base,bert-cls:base")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="threads of every setting but threads-N")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("-o", "--output", default="inductor-settings.md")
    ap.add_argument("--work", help="keep the compiled packages here and reuse them (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="graphopt-settings-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        for model in args.models.split(","):
            for precision in args.precisions.split(","):
                rows += measure(model, precision, args.settings.split(","), [int(b) for b in args.batch_sizes.split(",")],
                                args.seq, args.threads, args.rounds, work)
    cpu = machine_info()
    head = (f"# Inductor settings\n\n`python benchmarks/bench_inductor_settings.py {' '.join(sys.argv[1:])}`, "
            f"{time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s. CPU: {cpu['cpu']} "
            f"({', '.join(cpu['cpu_flags'])}), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
            f"torch {torch.__version__}. Seq {args.seq}; ratios are from one interleaved run.\n\n")
    Path(args.output).write_text(head + table(rows) + "\n")
    Path(args.output).with_suffix(".json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1, default=str))
    print(head + table(rows))


if __name__ == "__main__":
    main()
