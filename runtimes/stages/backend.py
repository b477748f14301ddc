"""The ``stages`` backend: lower a Program that ``split-stages`` partitioned
into one saved Program per stage, and the helpers around its artifacts."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from graphopt.runtimes.stages.rendezvous import RUNTIME
from graphopt.runtimes.stages.runner import StagesRunner

from graphopt.errors import ArtifactError, LoweringError, PreconditionError
from graphopt.ir.program import Program
from graphopt.passlib.partition import compute_nodes, run_stages, split_program, stage_partition
from graphopt.runtime import Artifact, Backend, Option, load, lower, read_artifact, register_runtime

__all__ = ["StagesBackend", "BACKEND", "cut_positions", "lower_stages", "load_stages", "run_sequential"]

#: a pipeline step ``split-stages{... n=1 ...}``, which records no partition
_ONE_STAGE_SPLIT = re.compile(r"split-stages\{[^}]*\bn=1\b")
#: a pipeline step ``split-stages{max_memory=...}``, which records no partition when the
#: whole Program fits in one stage of that size
_FITS_ONE_STAGE = re.compile(r"split-stages\{[^}]*\bmax_memory=(?!none\b)([^\s}]+)")


def cut_positions(program: Program, stages: int | None = None) -> list[int]:
    """Where to cut ``program``: the cut positions of its split-stages partition.

    ``stages`` (when given) must equal the partition's stage count; ``stages=1``
    takes an unpartitioned Program whole. Raises PreconditionError naming the
    split-stages step to add when there is no partition, it has another stage
    count, or it no longer fits the graph. Reads ``program``, never changes it.
    """
    partition = stage_partition(program)
    if partition is None:
        if stages == 1:
            return []
        if _ONE_STAGE_SPLIT.search(program.pipeline or ""):
            raise PreconditionError(
                f"runtime '{RUNTIME}' runs one process per stage and needs split-stages with n >= 2, but "
                f"{program.name} went through 'split-stages{{n=1}}': use 'split-stages{{n=2}}' or more "
                "(or lower with stages=1, or pick another runtime, to run it whole in one process)"
            )
        fits = _FITS_ONE_STAGE.search(program.pipeline or "")
        if fits:
            raise PreconditionError(
                f"runtime '{RUNTIME}' runs one process per stage, but 'split-stages{{max_memory={fits.group(1)}}}' "
                f"fits {program.name} in one stage, so there is nothing to spread across processes: lower it "
                "for another runtime (or with stages=1), or lower max_memory (or use n=2) to get two stages or more"
            )
        raise PreconditionError(
            f"runtime '{RUNTIME}' needs a partitioned Program: add 'split-stages{{n={stages or 2}}}' "
            f"to the pipeline before lowering {program.name} (or lower with stages=1 for one stage)"
        )
    if stages is not None and stages != partition.n:
        raise PreconditionError(
            f"runtime '{RUNTIME}': {program.name} is partitioned into {partition.n} stages, not {stages}; "
            f"run 'split-stages{{n={stages}}}' instead"
        )
    return partition.positions(program)


class StagesBackend(Backend):
    name = RUNTIME
    summary = "stages across processes/hosts with torch.distributed (gloo/NCCL) and GPipe micro-batches"
    lower_options = (
        Option(
            "stages",
            int,
            None,
            "expected number of stages (default: the split-stages partition's; 1 takes an unpartitioned Program)",
        ),
        Option("device", str, "cpu", "cpu (gloo) or cuda (NCCL, one GPU per rank)"),
    )
    runner_options = (
        Option("microbatches", int, 1, "micro-batches per batch (GPipe); must divide the batch"),
        Option(
            "launch",
            str,
            "auto",
            "local: spawn ranks here; external: wait for `graphopt serve-stages` ranks",
            choices=("auto", "local", "external"),
        ),
        Option(
            "master_addr", str, None, "address rank 0 listens on (default MASTER_ADDR or 127.0.0.1)"
        ),
        Option("master_port", int, None, "port (default MASTER_PORT; a free one for launch=local)"),
        Option("timeout", float, 60.0, "seconds a stage waits on a peer before failing the run"),
        Option("join_timeout", float, 60.0, "seconds to wait for every rank to join"),
        Option("threads", int, None, "torch threads of each spawned rank"),
        Option("device", str, None, "override the device recorded at lowering"),
    )
    runner_class = StagesRunner

    def versions(self) -> dict[str, str]:
        return {"backend": f"torch.distributed {torch.__version__}"}

    def artifact_files(self, backend: Mapping[str, Any]) -> list[str]:
        files = [s["file"] for s in backend["stages"]]
        if len(files) != int(backend["num_stages"]) or not files:
            raise ValueError(f"num_stages is {backend['num_stages']} but {len(files)} stage files are named")
        return [backend["entry"], *files]

    def check_program(self, program: Program, options: Mapping[str, Any]) -> None:
        device = options["device"]
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise LoweringError(f"{RUNTIME} | device must be cpu or cuda, got {device!r}")
        cut_positions(program, options["stages"])

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        positions = cut_positions(program, options["stages"])
        stages = split_program(program, positions)
        order = compute_nodes(program.gm)
        info: list[dict[str, Any]] = []
        for k, stage in enumerate(stages):
            stage.save(out / f"stage{k}.pt2")
            info.append(
                {
                    "file": f"stage{k}.pt2",
                    "inputs": stage.input_names,
                    "outputs": stage.output_names,
                    "parameter_bytes": stage.parameter_bytes(),
                }
            )
        return {
            "entry": "stage0.pt2",
            "num_stages": len(stages),
            "device": options["device"].split(":")[0],
            "cuts": [order[p - 1].name for p in positions],
            "stages": info,
        }


BACKEND = register_runtime(StagesBackend())


def lower_stages(
    program: Program, out_dir: str | os.PathLike[str], force: bool = False, **options: Any
) -> Artifact:
    """``graphopt.lower(program, "stages", ...)``."""
    return lower(program, RUNTIME, out_dir, force=force, **options)


def load_stages(out_dir: str | os.PathLike[str], **options: Any) -> StagesRunner:
    """``graphopt.load(out_dir, ...)`` for a ``stages`` artifact (refuses any other)."""
    runner = load(out_dir, **options)
    if not isinstance(runner, StagesRunner):
        raise ArtifactError(f"{out_dir} is a '{runner.name}' artifact, not a '{RUNTIME}' one")
    return runner


def run_sequential(
    out_dir: str | os.PathLike[str], inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Run every stage of a ``stages`` artifact one after another in this process
    (the single-process reference for what the distributed run returns)."""
    artifact = read_artifact(out_dir)
    stages = [Program.load(artifact.file(s["file"])) for s in artifact.backend["stages"]]
    return run_stages(stages, inputs)
