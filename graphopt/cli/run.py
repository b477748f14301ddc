"""``graphopt run OUT --random-inputs [--batch N --seq N]``: load an artifact and run it.

OUT is an artifact folder (``manifest.json``), an ``optimize -o`` folder
holding one lowered runtime subfolder (``OUT/<runtime>/``; pick one with
``--runtime`` when there are several), or a folder/file with only
``program.pt2`` (run eagerly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from graphopt.cli.argtypes import positive_int
from graphopt.errors import ArtifactError, LoweringError, PipelineParseError, first_line
from graphopt.runtime import MANIFEST_FILE, RENAMED_RUNTIMES, Runner, canonical_runtime, get_runtime, load


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="load a lowered artifact and run it on inputs")
    p.add_argument("target", help="artifact folder, `optimize -o` folder, or saved Program")
    p.add_argument("--runtime", help="which OUT/<runtime>/ artifact to run when OUT holds several")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--random-inputs", action="store_true", help="seeded random inputs from the input specs")
    src.add_argument("--inputs", metavar="FILE", help="torch.save'd dict (by input name) or tuple of tensors")
    p.add_argument("--batch", type=positive_int, help="batch size for --random-inputs")
    p.add_argument("--seq", type=positive_int, help="sequence length for --random-inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=positive_int, default=5, help="timed runs (median reported)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 pass (manifest, paths and sizes are still checked); a damaged file "
                        "may then crash the process (AOTInductor) or return wrong scores (TorchScript, ONNX)")
    p.set_defaults(run=run)


def resolve_runner(target: str, runtime: str | None = None, verify: bool = True) -> Runner:
    """An (inactive) Runner for what ``graphopt run`` is pointed at."""
    path = Path(target)
    if runtime:
        try:  # an unknown name is a usage error (rc 2, as `optimize --runtime`), whatever the target holds
            runtime = canonical_runtime(runtime)
            get_runtime(runtime)
        except LoweringError as e:
            raise PipelineParseError(f"--runtime: {e}") from None
    if not path.exists():
        raise ArtifactError(f"no such file or directory: {target}; point at an artifact folder, an `optimize -o` "
                            "folder or a saved Program")
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        runner = load(path, verify=verify)
        if runtime and runner.name != runtime:
            raise ArtifactError(f"{path} is the {runner.name} artifact, not {runtime}; drop --runtime, or point "
                                f"at the {runtime}/ folder that `optimize --runtime {runtime}` writes")
        return runner
    if path.is_dir():
        if runtime:
            # OUT/<name>/, or the folder an older graphopt wrote under a renamed runtime's old name
            for folder in (runtime, *(old for old, new in RENAMED_RUNTIMES.items() if new == runtime)):
                if (path / folder / MANIFEST_FILE).is_file():
                    return load(path / folder, verify=verify)
            if runtime != "eager":
                raise ArtifactError(f"{path} has no {runtime}/ artifact; lower with `optimize --runtime {runtime}`")
        found = sorted(d.name for d in path.iterdir() if (d / MANIFEST_FILE).is_file())
        if len(found) == 1 and not runtime:
            return load(path / found[0], verify=verify)
        if len(found) > 1 and not runtime:
            raise ArtifactError(f"{path} holds artifacts for {', '.join(found)}; pick one with --runtime")
        path = path / "program.pt2"
    if path.is_file() and path.suffix == ".pt2":
        if runtime not in (None, "eager"):
            raise ArtifactError(f"{target} is a saved Program, which runs eagerly: drop --runtime {runtime}, or lower "
                                f"it first with `graphopt optimize {target} -p dce --runtime {runtime} -o OUT` "
                                f"and run OUT")
        from graphopt.ir.program import Program
        from graphopt.runtimes.eager import EagerRunner

        return EagerRunner.from_program(Program.load(path))
    raise ArtifactError(
        f"{target} is neither an artifact folder nor a saved Program; "
        "write one with `graphopt optimize MODEL -p PIPELINE --runtime NAME -o OUT`"
    )


def _inputs(runner: Runner, args: argparse.Namespace) -> list[torch.Tensor]:
    if args.inputs:
        try:
            data: Any = torch.load(args.inputs, weights_only=True)
        except FileNotFoundError:
            raise ArtifactError(f"--inputs {args.inputs}: no such file") from None
        except Exception as e:  # not a torch.save file, or one holding more than tensors
            raise ArtifactError(f"--inputs {args.inputs}: not a file of tensors torch.load can read safely "
                                f"({first_line(e, with_type=True, limit=80)}); write it with torch.save(dict or "
                                "tuple of tensors)") from None
        if isinstance(data, dict):
            return [data.get(name) for name in runner.input_names]
        return list(data) if isinstance(data, (list, tuple)) else [data]
    sizes = {k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v is not None}
    _check_sizes(runner, sizes, args.target)  # before sampling: --seq 10**9 allocated gigabytes, then met the contract
    gen = torch.Generator().manual_seed(args.seed)
    return [spec.sample(sizes, gen) for spec in runner.inputs]


def _check_sizes(runner: Runner, sizes: dict[str, int], target: str) -> None:
    """Refuse --batch/--seq outside the dims the artifact's manifest proved, or too large to sample here."""
    from graphopt.runtime.contract import size_outside

    dims = dict(getattr(runner, "_dims", None) or {})  # the manifest's (or the Program's) proven ranges
    outside = size_outside(dims, target, [(f"--{k}", k, [v]) for k, v in sizes.items()])
    if outside:
        raise PipelineParseError(outside)
    total = 0
    for spec in runner.inputs:
        numel = 1
        for i, s in enumerate(spec.shape):
            numel *= int(sizes.get(spec.dynamic.get(i, ""), s))
        total += numel * spec.dtype.itemsize
    memory = _physical_memory()
    if memory and total > memory // 2:
        flags = " ".join(f"--{k} {v}" for k, v in sizes.items())
        raise PipelineParseError(f"{flags}: the random inputs alone would take {total / 2**30:.1f} GiB, more than "
                                 f"half of this machine's {memory / 2**30:.1f} GiB; pick smaller sizes")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def run(args: argparse.Namespace) -> int:
    runner = resolve_runner(args.target, args.runtime, verify=not args.no_verify)
    with runner:
        inputs = _inputs(runner, args)
        outputs = runner(*inputs)  # warm-up (and the result shown)
        times = []
        for _ in range(max(args.repeat, 1)):
            runner.synchronize()
            start = time.perf_counter()
            runner(*inputs)
            runner.synchronize()
            times.append(time.perf_counter() - start)
    print(f"runtime {runner.name} on {runner.device}; inputs "
          + ", ".join(f"{s.name}{list(t.shape)}" for s, t in zip(runner.inputs, inputs)))
    for name, out in zip(runner.output_names, outputs):
        f = out.float()
        print(f"  {name}: {out.dtype} {list(out.shape)}  mean {f.mean().item():.5g}  std {f.std().item():.5g}")
    summary = {
        "runtime": runner.name,
        "target": args.target,
        "device": runner.device,
        "inputs": {s.name: list(t.shape) for s, t in zip(runner.inputs, inputs)},
        "outputs": {n: list(o.shape) for n, o in zip(runner.output_names, outputs)},
        "median_ms": round(statistics.median(times) * 1e3, 3),
    }
    print(json.dumps(summary))
    return 0
