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
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from graphopt.runtimes.stages.host import StageHost
from graphopt.runtimes.stages.rendezvous import (
    HEARTBEAT_S,
    RUNTIME,
    artifact_identity,
    check_world,
    connect,
    destroy_group,
    identity_mismatch,
    key,
    parent_gone,
    stage_device,
    wait_key,
)

from graphopt.errors import GraphoptError, RunnerError, first_line
from graphopt.runtime import read_artifact

__all__ = ["serve_stage", "worker_main", "publish_refusal"]

log = logging.getLogger(__name__)

#: the flags the Runner passes to locally spawned ranks
WORKER_FLAGS = (
    "artifact", "rank", "world_size", "addr", "port", "timeout", "join_timeout", "parent", "threads", "log"
)
#: how long a refusing rank tries to reach rank 0 to tell it why
_REFUSAL_REACH_S = 3.0


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
    try:
        artifact = read_artifact(artifact_dir)
        n = check_world(artifact, rank, world_size)
        if rank == 0:
            raise RunnerError(
                f"{RUNTIME} | rank 0 drives the stages: run it with a Runner or `graphopt serve-stages`"
            )
        device = device or artifact.backend.get("device", "cpu")
        host = StageHost(artifact, rank, n, stage_device(device, rank))
    except Exception as e:  # tell rank 0 why, so it stops waiting for this rank at once
        publish_refusal(e, rank, master_addr, master_port, min(join_timeout_s, _REFUSAL_REACH_S), parent_pid)
        raise
    store = connect(master_addr, master_port, rank, join_timeout_s, parent_pid)
    _claim(store, rank, n)
    mine = artifact_identity(artifact)
    store.set(key("joined", rank), json.dumps({"pid": os.getpid(), "artifact": mine}))
    differs = _check_rank0_artifact(store, rank, mine, join_timeout_s)
    if differs:  # rank 0 refuses this rank as well, and says so on its side
        raise RunnerError(f"{RUNTIME} | {differs}; copy the same artifact folder ({artifact.path}) to every host")
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(store, rank, stop), name=f"{RUNTIME}-alive", daemon=True).start()
    try:
        host.init_group(store, timeout_s)
        log.info("rank %d serving stage %d of %s", rank, rank, artifact.path)
        _serve(store, host, rank, master_addr, master_port, parent_pid)
    finally:
        stop.set()
        destroy_group()


def _serve(store: Any, host: StageHost, rank: int, addr: str, port: int, parent_pid: int | None) -> None:
    step = 0
    while True:
        name = key("step", step)
        if not wait_key(store, name, parent_pid):
            raise _Rank0Gone(f"{RUNTIME} | rank {rank}: rank 0 at tcp://{addr}:{port} went away")
        header = json.loads(store.get(name))
        if header["op"] == "stop":
            return
        if header["op"] == "stats":
            store.set(key("stats", step, rank), json.dumps(host.stats()))
        else:
            try:
                host.step(header)
            except Exception as e:
                why = f"rank {rank} (stage {rank}) failed in a run: {first_line(e, with_type=False)}"
                try:
                    store.set(key("failed", rank), why)
                except Exception:  # rank 0 is gone as well
                    pass
                raise RunnerError(f"{RUNTIME} | {why}") from e
        step += 1


class _Rank0Gone(RunnerError):
    """Rank 0's store closed (or the parent that spawned this rank exited)."""


def _claim(store: Any, rank: int, n: int) -> None:
    """Refuse a second process serving ``rank`` of the same rank 0 (two RANK=1)."""
    if int(store.add(key("claim", rank), 1)) == 1:
        store.set(key("owner", rank), str(os.getpid()))
        return
    owner = ""
    deadline = time.monotonic() + 1.0
    while not owner and time.monotonic() < deadline:
        owner = store.get(key("owner", rank)).decode() if store.check([key("owner", rank)]) else ""
        time.sleep(0.02 if not owner else 0)
    raise RunnerError(
        f"{RUNTIME} | rank {rank} is already served by another process ({f'pid {owner}' if owner else 'it joined first'});"
        f" give each process its own RANK in 1..{n - 1} (rank 0 drives)"
    )


def _heartbeat(store: Any, rank: int, stop: threading.Event) -> None:
    """Bump ``alive/<rank>`` while this rank runs, so rank 0 can name a rank that is gone."""
    try:
        mine = store.clone() if hasattr(store, "clone") else store
        while not stop.is_set():
            mine.add(key("alive", rank), 1)
            stop.wait(HEARTBEAT_S)
    except Exception as e:  # rank 0 is gone; the main loop says so
        log.debug("heartbeat stopped: %s", e)


def publish_refusal(
    error: BaseException, rank: int, addr: str, port: int, reach_s: float, parent_pid: int | None = None
) -> None:
    """Tell rank 0 (within ``reach_s``) why this rank will not start, so it fails at once."""
    reason = str(error).split("\n")[0].removeprefix(f"{RUNTIME} | ")
    try:
        store = connect(addr, port, rank, reach_s, parent_pid)
        store.set(key("refused"), f"rank {rank} refused to start: {reason}")
    except Exception as e:  # rank 0 not there (yet): the error on this side is what matters
        log.debug("could not tell rank 0 why: %s", e)


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
    parent = int(a.parent) if a.parent else None
    if parent is not None:
        threading.Thread(target=_watch_parent, args=(parent, a.log), name=f"{RUNTIME}-parent", daemon=True).start()
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
            parent_pid=parent,
        )
    except GraphoptError as e:  # a refused artifact (ArtifactError) too: one line, not a traceback
        if parent is not None and (isinstance(e, _Rank0Gone) or parent_gone(parent)):
            _orphaned(a.log)  # rank 0 spawned this rank and is gone: nobody reads its log
        print(f"graphopt: error: {e}", file=sys.stderr)
        return 1
    return 0


def _watch_parent(parent: int, log_path: str | None) -> None:
    """A spawned rank ends within a fraction of a second of the rank 0 that spawned it
    (whatever it is blocked in: loading, connecting, joining, a collective)."""
    while not parent_gone(parent):
        time.sleep(0.2)
    _orphaned(log_path)


def _orphaned(log_path: str | None) -> None:
    """Rank 0 is gone: nobody will read this rank's log; remove it and exit."""
    if log_path:
        try:
            os.unlink(log_path)
        except OSError:
            pass
    os._exit(1)
