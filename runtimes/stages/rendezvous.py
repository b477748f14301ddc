"""How the ranks of a ``stages`` artifact find each other: the TCPStore rank 0
listens on, the keys the ranks exchange through it, and the torch.distributed
process group (gloo on CPU, NCCL plus a gloo group for objects on CUDA).

Keys under ``graphopt/`` in the store: ``artifact`` (rank 0's
:func:`artifact_identity`), ``joined/<rank>`` (a rank's pid and artifact
identity as JSON, once it loaded its stage), ``step/<i>`` (rank 0's i-th command as JSON: run,
stats or stop) and ``stats/<i>/<rank>`` (a rank's answer to a stats command).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any

import torch

from graphopt.errors import ArtifactError, RunnerError, first_line
from graphopt.runtime import Artifact

__all__ = [
    "RUNTIME",
    "POLL_S",
    "key",
    "listen",
    "connect",
    "artifact_identity",
    "identity_mismatch",
    "wait_key",
    "init_group",
    "destroy_group",
    "check_world",
    "stage_device",
]

log = logging.getLogger(__name__)

#: this runtime's name, the prefix of its messages
RUNTIME = "stages"
#: how often rank 0 polls for joining ranks
POLL_S = 0.05
_PREFIX = "graphopt"


def key(*parts: object) -> str:
    """A key of this runtime in the TCPStore: ``key("step", 3)`` -> ``graphopt/step/3``."""
    return "/".join([_PREFIX, *map(str, parts)])


def listen(addr: str, port: int, join_timeout_s: float) -> Any:
    """Rank 0's TCPStore on ``addr:port`` (port 0: a free one)."""
    import torch.distributed as dist

    try:
        return dist.TCPStore(
            addr,
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=join_timeout_s),
        )
    except Exception as e:
        raise RunnerError(
            f"{RUNTIME} | cannot listen on {addr}:{port} ({first_line(e, with_type=False)}); pick another MASTER_PORT"
        ) from None


def connect(addr: str, port: int, rank: int, join_timeout_s: float) -> Any:
    """A serving rank's client of rank 0's TCPStore, within ``join_timeout_s``.

    The TCPStore constructor can block past its own timeout (a listener that
    accepts but never answers, a stopped rank 0), so it runs in a daemon thread
    that this rank stops waiting for at the deadline.
    """
    import torch.distributed as dist

    box: list[Any] = []

    def build() -> None:
        try:
            box.append(
                dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=join_timeout_s))
            )
        except Exception as e:
            box.append(e)

    thread = threading.Thread(target=build, name=f"{RUNTIME}-connect", daemon=True)
    thread.start()
    thread.join(join_timeout_s)
    if not box or isinstance(box[0], Exception):
        why = first_line(box[0], with_type=False) if box else "it accepted the connection but did not answer"
        raise RunnerError(
            f"{RUNTIME} | rank {rank} could not reach rank 0 at tcp://{addr}:{port} within "
            f"{join_timeout_s:g}s ({why}); start rank 0 first or check MASTER_ADDR/MASTER_PORT"
        )
    return box[0]


def artifact_identity(artifact: Artifact) -> dict[str, Any]:
    """What every rank must agree on: the sha256 of each stage file (from the
    manifest, which ``read_artifact`` checked the files against), and a digest of them."""
    files = {name: str(info["sha256"]) for name, info in sorted(artifact.manifest["files"].items())}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "files": files}


def identity_mismatch(rank0: dict[str, Any], rank: int, theirs: Any) -> str:
    """Empty when ``theirs`` (rank ``rank``'s :func:`artifact_identity`) equals
    rank 0's, else what differs, in a few words."""
    if not isinstance(theirs, dict) or "digest" not in theirs:
        return f"rank {rank} did not say which artifact it serves (an older graphopt?)"
    if theirs["digest"] == rank0["digest"]:
        return ""
    a, b = rank0.get("files") or {}, theirs.get("files") or {}
    names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    shown = "; ".join(
        f"{n} sha256 {str(b.get(n, 'missing'))[:12]} on rank {rank}, {str(a.get(n, 'missing'))[:12]} on rank 0"
        for n in names[:2]
    )
    return f"rank {rank} serves a different artifact than rank 0 ({shown or 'its files differ'})"


def wait_key(store: Any, name: str, parent_pid: int | None) -> bool:
    """Poll for ``name`` (fast right after a step, backing off to 20 ms when idle);
    False when the master store is gone or the parent that spawned us died."""
    delay = 0.0005
    while True:
        try:
            if store.check([name]):
                return True
        except Exception:  # DistNetworkError: rank 0's store closed
            return False
        if parent_pid is not None and os.getppid() != parent_pid:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.02)


def init_group(store: Any, rank: int, world_size: int, device: torch.device, timeout_s: float) -> Any:
    """Join the default process group; return the gloo group for objects
    (None on CPU, where the default group is gloo already)."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist.new_group(backend="gloo") if backend == "nccl" else None


def destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # after a peer crashed, teardown may complain; never mask the cause
            log.debug("destroy_process_group: %s", e)


def check_world(artifact: Artifact, rank: int, world_size: int) -> int:
    """The stage count of ``artifact``, once ``rank``/``world_size`` fit it."""
    if artifact.runtime != RUNTIME:
        raise ArtifactError(f"{artifact.path} was lowered for '{artifact.runtime}', not '{RUNTIME}'")
    n = int(artifact.backend["num_stages"])
    if world_size != n:
        raise RunnerError(
            f"{RUNTIME} | {artifact.path} has {n} stages, so WORLD_SIZE must be {n}, got {world_size}"
        )
    if not 0 <= rank < n:
        raise RunnerError(f"{RUNTIME} | RANK must be in 0..{n - 1}, got {rank}")
    return n


def stage_device(device: str, rank: int) -> str:
    """``cuda`` -> this rank's GPU (``LOCAL_RANK``, else the rank, modulo the GPUs here)."""
    if device.startswith("cuda") and ":" not in device:
        local = int(os.environ.get("LOCAL_RANK", rank))
        return f"cuda:{local % max(1, torch.cuda.device_count())}"
    return device
