"""A serving rank (>= 1) of a ``stages`` artifact: load its stage, join rank 0,
then run the commands rank 0 posts in the store until it says stop or goes
away. ``serve_stage`` is what ``graphopt serve-stages`` runs on other hosts;
``worker_main`` is the entry point of the ranks the Runner spawns locally."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from graphopt.runtimes.stages.host import StageHost
from graphopt.runtimes.stages.rendezvous import (
    RUNTIME,
    artifact_identity,
    check_world,
    connect,
    destroy_group,
    identity_mismatch,
    key,
    stage_device,
    wait_key,
)

from graphopt.errors import GraphoptError, RunnerError, first_line
from graphopt.runtime import read_artifact

__all__ = ["serve_stage", "worker_main"]

log = logging.getLogger(__name__)

#: the flags the Runner passes to locally spawned ranks
WORKER_FLAGS = ("artifact", "rank", "world_size", "addr", "port", "timeout", "join_timeout", "parent", "threads")


def serve_stage(
    artifact_dir: str | os.PathLike[str],
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    *,
    timeout_s: float = 60.0,
    join_timeout_s: float = 60.0,
    device: str | None = None,
    parent_pid: int | None = None,
) -> None:
    """Serve stage ``rank`` (>= 1) of a lowered ``stages`` artifact until rank 0 stops it.

    Raises RunnerError when rank 0 cannot be reached, the world size does not
    match the stage count, or rank 0 goes away mid-run.
    """
    artifact = read_artifact(artifact_dir)
    n = check_world(artifact, rank, world_size)
    if rank == 0:
        raise RunnerError(
            f"{RUNTIME} | rank 0 drives the stages: run it with a Runner or `graphopt serve-stages`"
        )
    device = device or artifact.backend.get("device", "cpu")
    host = StageHost(artifact, rank, n, stage_device(device, rank))
    store = connect(master_addr, master_port, rank, join_timeout_s)
    mine = artifact_identity(artifact)
    store.set(key("joined", rank), json.dumps({"pid": os.getpid(), "artifact": mine}))
    differs = _check_rank0_artifact(store, rank, mine, join_timeout_s)
    if differs:  # rank 0 refuses this rank as well, and says so on its side
        raise RunnerError(f"{RUNTIME} | {differs}; copy the same artifact folder ({artifact.path}) to every host")
    host.init_group(store, timeout_s)
    log.info("rank %d serving stage %d of %s", rank, rank, artifact.path)
    step = 0
    try:
        while True:
            name = key("step", step)
            if not wait_key(store, name, parent_pid):
                raise RunnerError(
                    f"{RUNTIME} | rank {rank}: rank 0 at tcp://{master_addr}:{master_port} went away"
                )
            header = json.loads(store.get(name))
            if header["op"] == "stop":
                break
            if header["op"] == "stats":
                store.set(key("stats", step, rank), json.dumps(host.stats()))
            else:
                try:
                    host.step(header)
                except Exception as e:
                    raise RunnerError(
                        f"{RUNTIME} | rank {rank} (stage {rank}) failed in a run: {first_line(e, with_type=False)}"
                    ) from e
            step += 1
    finally:
        destroy_group()


def _check_rank0_artifact(store: Any, rank: int, mine: dict[str, Any], join_timeout_s: float) -> str:
    """What differs between this rank's artifact and rank 0's (empty when they
    agree, or when rank 0 does not publish its own: it still checks ours)."""
    deadline = time.monotonic() + min(join_timeout_s, 1.0)
    name = key("artifact")
    while not store.check([name]):  # rank 0 sets it before any rank can connect
        if time.monotonic() > deadline:
            return ""
        time.sleep(0.01)
    return identity_mismatch(json.loads(store.get(name)), rank, mine)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of locally spawned ranks (``python -c ...``): the flags of
    :data:`WORKER_FLAGS`, exit 1 with one ``graphopt: error:`` line on failure."""
    p = argparse.ArgumentParser()
    for name in WORKER_FLAGS:
        p.add_argument(f"--{name}")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(int(a.threads))
    try:
        serve_stage(
            a.artifact,
            int(a.rank),
            int(a.world_size),
            a.addr,
            int(a.port),
            timeout_s=float(a.timeout),
            join_timeout_s=float(a.join_timeout),
            parent_pid=int(a.parent),
        )
    except GraphoptError as e:  # a refused artifact (ArtifactError) too: one line, not a traceback
        print(f"graphopt: error: {e}", file=sys.stderr)
        return 1
    return 0
