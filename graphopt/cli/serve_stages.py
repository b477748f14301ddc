"""``graphopt serve-stages ARTIFACT``: run one rank of a lowered ``stages`` artifact.

Every rank runs the same command on its host; which stage it serves comes
from the torchrun variables (or the flags that override them)::

    # host A (rank 0: stage 0, drives the batches, prints the result)
    MASTER_ADDR=hostA MASTER_PORT=29500 WORLD_SIZE=2 RANK=0 graphopt serve-stages out/b4r/stages --check
    # host B (rank 1: stage 1, serves until rank 0 is done)
    MASTER_ADDR=hostA MASTER_PORT=29500 WORLD_SIZE=2 RANK=1 graphopt serve-stages out/b4r/stages

Without ``RANK``/``WORLD_SIZE`` (and no flags), rank 0 spawns the other ranks
on this host. Rank 0 runs ``--iterations`` batches of seeded random inputs and
prints latency, throughput and each rank's memory as JSON; ``--check`` also
compares with running the stages one after another in this process (exit 1
beyond 1e-5). ``serve-pipeline`` is the verb's old name: it still works, with
a one-line deprecation note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from graphopt.cli.argtypes import non_negative_int, positive_float, positive_int
from graphopt.errors import ArtifactError, GraphoptError, RunnerError
from graphopt.metrics import max_abs_error
from graphopt.runtime import read_artifact

TOLERANCE = 1e-5
#: the verb's old name, still accepted
OLD_NAME = "serve-pipeline"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve-stages", aliases=[OLD_NAME], help="run one rank of a stages artifact (torch.distributed)"
    )
    p.add_argument("artifact", help="folder written by lowering with the `stages` runtime")
    p.add_argument(
        "--rank", type=non_negative_int, help="this process's rank (default: $RANK, else 0 and spawn the others)"
    )
    p.add_argument("--world-size", type=positive_int, help="number of ranks = stages (default: $WORLD_SIZE)")
    p.add_argument("--master-addr", help="rank 0's address (default: $MASTER_ADDR or 127.0.0.1)")
    p.add_argument("--master-port", type=positive_int, help="rank 0's port (default: $MASTER_PORT)")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds a stage waits on a peer mid-run")
    p.add_argument("--join-timeout", type=positive_float, default=60.0, help="seconds to wait for all ranks to join")
    p.add_argument("--threads", type=positive_int, help="torch threads in this process (and spawned ranks)")
    p.add_argument("--microbatches", type=positive_int, default=1, help="rank 0: micro-batches per batch")
    p.add_argument("--batch", type=positive_int, help="rank 0: batch size of the random inputs")
    p.add_argument("--seq", type=positive_int, help="rank 0: sequence length of the random inputs")
    p.add_argument("--iterations", type=positive_int, default=5, help="rank 0: timed batches after one warm-up")
    p.add_argument(
        "--check", action="store_true", help="rank 0: compare with the stages run in sequence here"
    )
    p.set_defaults(run=run)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def run(args: argparse.Namespace) -> int:
    from graphopt.runtimes import stages

    if args.verb == OLD_NAME:
        print(f"graphopt: `{OLD_NAME}` is now `serve-stages`; the old name will be removed", file=sys.stderr)
    rank = args.rank if args.rank is not None else _env_int("RANK")
    world = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE")
    addr = args.master_addr or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = args.master_port if args.master_port is not None else _env_int("MASTER_PORT")
    try:
        artifact = read_artifact(args.artifact, verify=False)  # the manifest only: which runtime it is for
        if artifact.runtime != "stages":
            raise ArtifactError(f"{args.artifact} was lowered for {artifact.runtime}; serve-stages serves split "
                                "models: graphopt optimize MODEL -p 'split-stages{n=2}' --runtime stages -o OUT, "
                                "then serve OUT/stages (`graphopt run` runs this one)")
    except GraphoptError as e:
        if rank and port is not None:  # tell rank 0 why, so it does not wait the whole join timeout
            from graphopt.runtimes.stages.worker import publish_refusal

            publish_refusal(e, rank, addr, port, min(args.join_timeout, 3.0))
        raise
    if args.threads:
        torch.set_num_threads(args.threads)
    if rank:  # a serving rank
        if world is None or port is None:
            raise RunnerError(
                "stages | rank >= 1 needs WORLD_SIZE and MASTER_PORT (or --world-size/--master-port)"
            )
        stages.serve_stage(
            args.artifact, rank, world, addr, port, timeout_s=args.timeout, join_timeout_s=args.join_timeout
        )
        return 0
    external = rank is not None or world is not None
    if external and world is not None:
        os.environ["WORLD_SIZE"] = str(world)  # the runner checks it against the stage count
    options = dict(
        microbatches=args.microbatches,
        timeout=args.timeout,
        join_timeout=args.join_timeout,
        launch="external" if external else "local",
        master_addr=addr,
        master_port=port,
        threads=args.threads,
    )
    runner = stages.load_stages(args.artifact, **options)
    sizes = {k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v is not None}
    gen = torch.Generator().manual_seed(0)
    inputs = [spec.sample(sizes, gen) for spec in runner.inputs]
    try:  # before the ranks start (seconds): a batch no call would take fails at once
        runner.check_call(inputs)
    except RunnerError as e:
        raise RunnerError(f"{e} (serve-stages: --batch, --seq, --microbatches)") from None
    with runner:
        where = runner.address or "this process"
        print(
            f"graphopt: stage ranks joined at {where}; running {args.iterations} batches",
            file=sys.stderr,
            flush=True,
        )
        outputs = runner(*inputs)  # warm-up: builds the schedule for this shape
        times = []
        for _ in range(max(args.iterations, 1)):
            start = time.perf_counter()
            runner(*inputs)
            times.append(time.perf_counter() - start)
        ranks = runner.stats()
    batch = inputs[0].shape[0]
    summary = {
        "artifact": args.artifact,
        "stages": len(ranks),
        "microbatches": args.microbatches,
        "inputs": {s.name: list(t.shape) for s, t in zip(runner.inputs, inputs)},
        "median_ms": round(statistics.median(times) * 1e3, 3),
        "samples_per_s": round(batch / statistics.median(times), 1),
        "ranks": ranks,
    }
    status = 0
    if args.check:
        reference = stages.run_sequential(args.artifact, inputs)
        error = max(max_abs_error(o, r) for o, r in zip(outputs, reference))
        summary["max_abs_error"] = error
        status = 0 if error <= TOLERANCE else 1
    print(json.dumps(summary))
    if status:  # the JSON stays on stdout; the reason is one line on stderr
        print(f"graphopt: error: stages | --check: max_abs_error {error:.3g} is above {TOLERANCE:g} against the "
              f"stages run one after another here ({args.artifact}); a rank may serve another copy of the "
              "artifact or compute differently on its host: copy the same artifact folder to every host and "
              "run again with --check", file=sys.stderr)
    return status
