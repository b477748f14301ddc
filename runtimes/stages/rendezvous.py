"""How the ranks of a ``stages`` artifact find each other: the TCPStore rank 0
listens on, the keys the ranks exchange through it, and the torch.distributed
process group (gloo on CPU, NCCL plus a gloo group for objects on CUDA).

Keys under ``graphopt/`` in the store: ``artifact`` (rank 0's
:func:`artifact_identity`), ``joined/<rank>`` (a rank's pid and artifact
identity as JSON, once it loaded its stage), ``step/<i>`` (rank 0's i-th command as JSON: run,
stats or stop), ``stats/<i>/<rank>`` (a rank's answer to a stats command), ``claim/<rank>``
(a counter: the second process claiming a rank is refused), ``refused`` (why a serving rank
refused to start, so rank 0 says it at once), ``alive/<rank>`` (a counter each serving rank
bumps while it runs, so rank 0 can name the one that is gone) and ``failed/<rank>`` (why a
serving rank stopped mid-run).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import socket
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
    "probe",
    "gloo_reason",
    "parent_gone",
    "HEARTBEAT_S",
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
#: how often a serving rank bumps its ``alive/<rank>`` counter
HEARTBEAT_S = 0.2
#: the slices a serving rank waits in, checking its parent between them
_SLICE_S = 0.25
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


def probe(addr: str, port: int, join_timeout_s: float, parent_pid: int | None = None) -> str:
    """Empty once something accepts a TCP connection on ``addr:port`` (retrying
    while it is refused, rank 0 may start later), else why not, in a few words."""
    deadline = time.monotonic() + join_timeout_s
    why = "nothing listens there: connection refused"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return why
        if parent_gone(parent_pid):
            return "the process that started this rank exited"
        try:
            with socket.create_connection((addr, port), timeout=min(_SLICE_S * 4, left)):
                return ""
        except ConnectionRefusedError:
            why = "nothing listens there: connection refused"
        except TimeoutError:
            why = "no answer from that host: a firewall or a wrong MASTER_ADDR"
        except OSError as e:
            why = e.strerror or str(e)
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def connect(addr: str, port: int, rank: int, join_timeout_s: float, parent_pid: int | None = None) -> Any:
    """A serving rank's client of rank 0's TCPStore, within ``join_timeout_s``.

    The port is probed with a plain socket first (refused and silent get their
    own reasons, and c10d never logs its retry traces). The TCPStore
    constructor can block past its own timeout (a listener that accepts but
    never answers, a stopped rank 0), so it runs in a daemon thread that this
    rank waits for in short slices, giving up at the deadline or when
    ``parent_pid`` (the rank 0 that spawned it) is gone.
    """
    import torch.distributed as dist

    start = time.monotonic()
    why = probe(addr, port, join_timeout_s, parent_pid)
    box: list[Any] = []
    if not why:

        def build() -> None:
            try:
                left = max(1.0, join_timeout_s - (time.monotonic() - start))
                box.append(dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=left)))
            except Exception as e:
                box.append(e)

        thread = threading.Thread(target=build, name=f"{RUNTIME}-connect", daemon=True)
        thread.start()
        while thread.is_alive() and time.monotonic() - start < join_timeout_s and not parent_gone(parent_pid):
            thread.join(_SLICE_S)
        if not box:
            why = (
                "the process that started this rank exited"
                if parent_gone(parent_pid)
                else "it accepted the connection but did not answer: is MASTER_PORT another service's?"
            )
        elif isinstance(box[0], Exception):
            why = gloo_reason(box[0])
    if why:
        raise RunnerError(
            f"{RUNTIME} | rank {rank} could not reach rank 0 at tcp://{addr}:{port} within "
            f"{join_timeout_s:g}s ({why}); start rank 0 first or check MASTER_ADDR/MASTER_PORT"
        )
    return box[0]


def parent_gone(parent_pid: int | None) -> bool:
    """True when this process was spawned by ``parent_pid`` and that process is gone."""
    return parent_pid is not None and os.getppid() != parent_pid


_GLOO_WHERE = re.compile(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*")


def gloo_reason(e: BaseException) -> str:
    """An error's first line without gloo/c10d's source locations and advice boilerplate."""
    text = _GLOO_WHERE.sub("", first_line(e, with_type=False))
    for tail in (". This is typically caused by", " This is typically caused by", ". Check the logs"):
        text = text.split(tail)[0]
    return text.strip().rstrip(".") or "connection lost"


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
        if parent_gone(parent_pid):
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
