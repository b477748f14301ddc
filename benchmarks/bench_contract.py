"""What each runtime does with bad requests, and what the input contract costs.

    python benchmarks/bench_contract.py table [--runtimes eager,torchscript,onnxruntime,inductor,stages]
    python benchmarks/bench_contract.py cost [--model bert4rec:base --runtimes onnxruntime,eager --rounds 15]

``table``: bert4rec:tiny optimized with ``O2`` (dlrm:tiny for the NaN row: it
is the zoo's model with a float input), lowered to each runtime and called
through ``graphopt.load(dir)`` with each bad request, once with the contract
on (what graphopt does now) and once with ``runner.check_contract = False``
(what the backend alone does; these run in a child process per runtime,
restarted after a case that kills it, so an abort is reported, not suffered).
Prints a markdown table; a cell is the one-line error, "returns scores" or
"process aborts (exit N)".

``cost``: per runtime, interleaved rounds of N batch-1 calls with the contract
on and off (order alternating per round), the median per-call latency of
each and their difference; plus the check alone (``check_contract`` on the
same feeds, 2000 calls). Timings on a shared machine are noisy: compare the
on/off pair of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

CASES = ["id = vocab + 3", "id = -1", "seq 600 (512 positions)", "mask seq 15, ids seq 16", "int32 ids",
         "rank-1 mask", "empty batch", "NaN in a float input"]


def _bad_request(case: str, program, rows: int):  # type: ignore[no-untyped-def]
    """The feeds of one bad request for ``program`` (bert4rec:tiny; dlrm:tiny for NaN)."""
    if case == "NaN in a float input":
        dense, sparse = program.sample_inputs(batch=2, seed=3)
        dense = dense.clone()
        dense[0, 3] = float("nan")
        return dense, sparse
    ids, mask = program.sample_inputs(batch=2, seq=16, seed=3)
    if case == "id = vocab + 3":
        return ids.index_fill(1, torch.tensor([3]), rows + 3), mask
    if case == "id = -1":
        return ids.index_fill(1, torch.tensor([2]), -1), mask
    if case == "seq 600 (512 positions)":
        return torch.ones(1, 600, dtype=torch.long), torch.ones(1, 600, dtype=torch.long)
    if case == "mask seq 15, ids seq 16":
        return ids, mask[:, :15]
    if case == "int32 ids":
        return ids.int(), mask
    if case == "rank-1 mask":
        return ids, mask[0]
    if case == "empty batch":
        return ids[:0], mask[:0]
    raise ValueError(case)


def _outcome(runner, feeds) -> str:  # type: ignore[no-untyped-def]
    import graphopt

    try:
        out = runner(*feeds)
    except graphopt.GraphoptError as e:
        return str(e).replace("|", "\\|")
    except Exception as e:  # noqa: BLE001 - what the backend raises without the contract
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}".replace("|", "\\|")
    nan = any(bool(torch.isnan(o).any()) for o in out if o.is_floating_point())
    return "returns scores" + (" (NaN)" if nan else "")


def _artifacts(runtimes: list[str], root: Path) -> dict[tuple[str, str], Path]:
    import graphopt
    from graphopt.rec.zoo import load_model

    out = {}
    for model in ("bert4rec:tiny", "dlrm:tiny"):
        program = load_model(model).capture()
        o2, _ = graphopt.optimize(program, "O2", verify_each=False)
        for rt in runtimes:
            prog = graphopt.optimize(o2, "split-stages{n=2}", verify_each=False)[0] if rt == "stages" else o2
            path = root / f"{model.replace(':', '-')}-{rt}"
            opts = {"device": "cpu"} if rt in ("eager", "torchscript", "inductor") else {}
            graphopt.lower(prog, rt, path, **opts)
            out[(model, rt)] = path
    return out


def _child(path: str, model: str, cases: list[str], contract: bool) -> None:
    """Run ``cases`` on one artifact in this process; one JSON line per case, flushed
    before the call (so a crash is attributed to the case that caused it)."""
    import graphopt
    from graphopt.rec.zoo import load_model

    program = load_model(model).capture()
    for case in cases:  # a fresh runner per case: a failed stages run stops its runner
        runner = graphopt.load(path)
        runner.check_contract = contract
        rows = int((runner.artifact.manifest.get("index_ranges") or {}).get("input_ids", [0, 0])[1])
        print(json.dumps({"case": case, "started": True}), flush=True)
        print(json.dumps({"case": case, "result": _outcome(runner, _bad_request(case, program, rows))}), flush=True)
        runner.close()


def _run_cases(path: Path, model: str, cases: list[str], contract: bool) -> dict[str, str]:
    results: dict[str, str] = {}
    todo = list(cases)
    while todo:
        proc = subprocess.run([sys.executable, __file__, "_child", str(path), model, json.dumps(todo),
                               "1" if contract else "0"], capture_output=True, text=True)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if "result" in rec:
                results[rec["case"]] = rec["result"]
                started = None
            else:
                started = rec["case"]
        if started is not None:  # the process died inside this case
            tail = (proc.stderr.strip().splitlines() or [""])[-1][:100]
            results[started] = f"**process aborts** (exit {proc.returncode}: {tail})".replace("|", "\\|")
        elif proc.returncode != 0 and not results:
            raise RuntimeError(proc.stderr[-2000:])
        todo = [c for c in todo if c not in results]
    return results


def table(args: argparse.Namespace) -> None:
    runtimes = [r for r in args.runtimes.split(",") if r]
    with tempfile.TemporaryDirectory() as td:
        arts = _artifacts(runtimes, Path(td))
        for contract in (True, False):
            print(f"\n### contract {'on (graphopt now)' if contract else 'off (the backend alone)'}\n")
            print("| request | " + " | ".join(runtimes) + " |")
            print("|---" * (len(runtimes) + 1) + "|")
            cells: dict[str, dict[str, str]] = {}
            for rt in runtimes:
                bert = _run_cases(arts[("bert4rec:tiny", rt)], "bert4rec:tiny", CASES[:-1], contract)
                dlrm = _run_cases(arts[("dlrm:tiny", rt)], "dlrm:tiny", CASES[-1:], contract)
                cells[rt] = {**bert, **dlrm}
            for case in CASES:
                print(f"| {case} | " + " | ".join(cells[rt][case] for rt in runtimes) + " |")


def cost(args: argparse.Namespace) -> None:
    import graphopt
    from graphopt.rec.zoo import load_model
    from graphopt.runtime.contract import check_contract

    torch.set_num_threads(args.threads)
    program = load_model(args.model).capture()
    o2, _ = graphopt.optimize(program, "O2", verify_each=False)
    feeds = program.sample_inputs(batch=1, seq=args.seq, seed=0)
    with tempfile.TemporaryDirectory() as td:
        for rt in [r for r in args.runtimes.split(",") if r]:
            opts = {"device": "cpu"} if rt in ("eager", "torchscript", "inductor") else {}
            path = Path(td) / rt
            graphopt.lower(o2, rt, path, **opts)
            runner_opts = {"intra_op_threads": args.threads, "spin": False} if rt == "onnxruntime" else {}
            with graphopt.load(path, **runner_opts) as runner:
                for _ in range(20):
                    runner(*feeds)
                on, off = [], []
                for r in range(args.rounds):
                    for flag in ((True, False) if r % 2 == 0 else (False, True)):
                        runner.check_contract = flag
                        start = time.perf_counter()
                        for _ in range(args.calls):
                            runner(*feeds)
                        (on if flag else off).append((time.perf_counter() - start) / args.calls)
                m = runner.artifact.manifest
                start = time.perf_counter()
                for _ in range(2000):
                    check_contract(runner.inputs, list(feeds), m.get("dims") or {}, m.get("index_ranges") or {}, rt)
                alone = (time.perf_counter() - start) / 2000
            p_on, p_off = statistics.median(on), statistics.median(off)
            print(f"{args.model} batch 1 seq {feeds[0].shape[-1]} {rt}: contract on {p_on * 1e3:.3f} ms, "
                  f"off {p_off * 1e3:.3f} ms (median of {args.rounds} interleaved rounds x {args.calls} calls), "
                  f"on/off {p_on / p_off:.4f}; the check alone {alone * 1e6:.1f} us "
                  f"= {100 * alone / p_off:.2f}% of the call")


def main() -> int:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("GRAPHOPT_VERIFY_EACH", "0")
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5] == "1")
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table")
    t.add_argument("--runtimes", default="eager,torchscript,onnxruntime,inductor,stages")
    c = sub.add_parser("cost")
    c.add_argument("--model", default="bert4rec:base")
    c.add_argument("--runtimes", default="onnxruntime,eager")
    c.add_argument("--seq", type=int, default=64)
    c.add_argument("--rounds", type=int, default=15)
    c.add_argument("--calls", type=int, default=50)
    c.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    (table if args.what == "table" else cost)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
