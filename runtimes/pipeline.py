"""``pipeline``: run a Program as n pipeline stages, one process per stage.

Lowering cuts the Program where ``split-stages`` put its partition (or runs
that pass with ``stages=N``) and writes one saved Program per stage,
``stage0.pt2`` .. ``stage{n-1}.pt2``, plus the manifest. Running uses
``torch.distributed`` (gloo on CPU, NCCL on CUDA) and a GPipe schedule from
``torch.distributed.pipelining``: the batch is cut into ``microbatches``
that flow through the stages, and the last stage's merged outputs come back
to rank 0, equal to the single-process Program.

Rank 0 is the process holding the Runner; it hosts stage 0. The other ranks
are either spawned on this host (``launch=local``: ports picked free on
127.0.0.1) or started elsewhere with ``graphopt serve-pipeline ARTIFACT`` and
the torchrun variables ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE`` (``launch=external``, the default when ``WORLD_SIZE`` is set).
A rank that does not join within ``join_timeout`` fails activation with the
address it waited on; a stage that dies mid-run makes the others fail within
``timeout`` seconds (gloo sees the closed connection at once) instead of
hanging.

The runtime registry of ``graphopt.runtime`` does not list ``pipeline`` yet:
importing this module registers it (``lower_pipeline``/``load_pipeline`` do).
"""

from __future__ import annotations

import datetime
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import ArtifactError, LoweringError, RunnerError, first_line
from graphopt.ir.program import Program
from graphopt.passlib.partition import compute_nodes, resolve_partition, run_stages, split_program
from graphopt.process import reset_peak_rss, rss_kb
from graphopt.runtime import (
    Artifact,
    Backend,
    Option,
    Runner,
    load,
    lower,
    read_artifact,
    register_runtime,
    resolve_device,
)

__all__ = [
    "PipelineBackend",
    "PipelineRunner",
    "BACKEND",
    "lower_pipeline",
    "load_pipeline",
    "serve_stage",
    "run_sequential",
]

log = logging.getLogger(__name__)

_KEY = "graphopt"  # prefix of this runtime's keys in the TCPStore
_POLL_S = 0.05


# ---------------------------------------------------------------- stage host
class _StageModule(torch.nn.Module):
    """A stage GraphModule whose outputs are a tuple of contiguous tensors (for send)."""

    def __init__(self, gm: torch.nn.Module):
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.gm(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(t.contiguous() for t in out)


class _StageHost:
    """One rank: its stage module, the process group and a GPipe schedule per
    input signature (shapes + micro-batch count)."""

    def __init__(self, artifact: Artifact, rank: int, world_size: int, device: str):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        for module in ("torch._export.serde.serialize", "torch.distributed.pipelining"):
            importlib.import_module(module)  # so the RSS below does not count loader code
        reset_peak_rss()
        self.rss_start_mb = rss_kb()[0] / 1024
        program = Program.load(artifact.path / artifact.backend["stages"][rank]["file"])
        gm = program.gm.to(self.device) if self.device.type != "cpu" else program.gm
        self.module = _StageModule(gm)
        self.rss_loaded_mb = rss_kb()[0] / 1024
        self.parameter_bytes = program.parameter_bytes()
        self.ctrl: Any = None  # gloo group for objects (the default group on CPU)
        self._schedules: dict[str, Any] = {}

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def init_group(self, store: Any, timeout_s: float) -> None:
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.ctrl = dist.new_group(backend="gloo") if backend == "nccl" else None

    def _metas(
        self, inputs: Sequence[tuple[list[int], str]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Input and output meta tensors of one micro-batch, by fake-tensor propagation
        (pipelining's own inference would run the stage on uninitialized buffers)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        specs = [(shape, getattr(torch, dtype)) for shape, dtype in inputs]
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            outs = self.module(
                *(torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in specs)
            )
        ins = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in specs]
        return ins, [torch.empty(o.shape, dtype=o.dtype, device="meta") for o in outs]

    def _schedule(self, signature: str, n_micro: int, micro_inputs: Any) -> Any:
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        if signature in self._schedules:
            return self._schedules[signature]
        if self.rank > 0:  # input metas of this stage come from the previous one
            box: list[Any] = [None]
            dist.recv_object_list(box, src=self.rank - 1, group=self.ctrl)
            micro_inputs = box[0]
        ins, outs = self._metas(micro_inputs)
        if not self.is_last:
            dist.send_object_list(
                [[(list(o.shape), str(o.dtype).replace("torch.", "")) for o in outs]],
                dst=self.rank + 1,
                group=self.ctrl,
            )
        stage = PipelineStage(
            self.module,
            self.rank,
            self.world_size,
            self.device,
            input_args=tuple(ins),
            output_args=tuple(outs),
        )
        schedule = ScheduleGPipe(stage, n_micro)
        if len(self._schedules) >= 8:
            self._schedules.pop(next(iter(self._schedules)))
        self._schedules[signature] = schedule
        return schedule

    def step(self, header: Mapping[str, Any], inputs: Sequence[torch.Tensor] | None = None) -> tuple | None:
        """Run one batch; rank 0 passes ``inputs`` and gets the outputs back."""
        import torch.distributed as dist

        n_micro = int(header["microbatches"])
        micro = [([s[0] // n_micro, *s[1:]], d) for s, d in header["inputs"]]
        schedule = self._schedule(json.dumps([n_micro, header["inputs"]]), n_micro, micro)
        with torch.no_grad():
            if self.rank == 0:
                out = schedule.step(*(t.to(self.device) for t in inputs or ()))
            else:
                out = schedule.step()
        if self.is_last and self.rank > 0:
            dist.send_object_list([tuple(t.cpu() for t in out)], dst=0, group=self.ctrl)
            return None
        if self.rank == 0 and not self.is_last:
            box: list[Any] = [None]
            dist.recv_object_list(box, src=self.world_size - 1, group=self.ctrl)
            return tuple(box[0])
        return tuple(out) if self.is_last else None

    def stats(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "parameter_bytes": self.parameter_bytes,
            "rss_start_mb": round(self.rss_start_mb, 1),
            "rss_loaded_mb": round(self.rss_loaded_mb, 1),
            "rss_peak_mb": round(rss_kb()[1] / 1024, 1),
        }


def _header_of(inputs: Sequence[torch.Tensor], n_micro: int, op: str = "run") -> dict[str, Any]:
    return {
        "op": op,
        "microbatches": n_micro,
        "inputs": [[list(t.shape), str(t.dtype).replace("torch.", "")] for t in inputs],
    }


# ------------------------------------------------------------------- workers
def _connect(addr: str, port: int, rank: int, join_timeout_s: float) -> Any:
    import torch.distributed as dist

    try:
        return dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=join_timeout_s))
    except Exception as e:
        raise RunnerError(
            f"pipeline | rank {rank} could not reach rank 0 at tcp://{addr}:{port} within "
            f"{join_timeout_s:g}s ({first_line(e, with_type=False)}); start rank 0 first or check MASTER_ADDR/MASTER_PORT"
        ) from None


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
    """Serve stage ``rank`` (>= 1) of a lowered pipeline until rank 0 stops it.

    Raises RunnerError when rank 0 cannot be reached, the world size does not
    match the stage count, or rank 0 goes away mid-run.
    """
    artifact = read_artifact(artifact_dir)
    n = _check_world(artifact, rank, world_size)
    if rank == 0:
        raise RunnerError(
            "pipeline | rank 0 drives the pipeline: run it with a Runner or `graphopt serve-pipeline`"
        )
    device = device or artifact.backend.get("device", "cpu")
    host = _StageHost(artifact, rank, n, _stage_device(device, rank))
    store = _connect(master_addr, master_port, rank, join_timeout_s)
    store.set(f"{_KEY}/joined/{rank}", str(os.getpid()))
    host.init_group(store, timeout_s)
    log.info("rank %d serving stage %d of %s", rank, rank, artifact.path)
    step = 0
    try:
        while True:
            key = f"{_KEY}/step/{step}"
            if not _wait_key(store, key, parent_pid):
                raise RunnerError(
                    f"pipeline | rank {rank}: rank 0 at tcp://{master_addr}:{master_port} went away"
                )
            header = json.loads(store.get(key))
            if header["op"] == "stop":
                break
            if header["op"] == "stats":
                store.set(f"{_KEY}/stats/{step}/{rank}", json.dumps(host.stats()))
            else:
                try:
                    host.step(header)
                except Exception as e:
                    raise RunnerError(
                        f"pipeline | rank {rank} (stage {rank}) failed in a run: {first_line(e, with_type=False)}"
                    ) from e
            step += 1
    finally:
        _destroy_group()


def _wait_key(store: Any, key: str, parent_pid: int | None) -> bool:
    """Poll for ``key`` (fast right after a step, backing off to 20 ms when idle);
    False when the master store is gone or the parent that spawned us died."""
    delay = 0.0005
    while True:
        try:
            if store.check([key]):
                return True
        except Exception:  # DistNetworkError: rank 0's store closed
            return False
        if parent_pid is not None and os.getppid() != parent_pid:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.02)


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # after a peer crashed, teardown may complain; never mask the cause
            log.debug("destroy_process_group: %s", e)


def _check_world(artifact: Artifact, rank: int, world_size: int) -> int:
    if artifact.runtime != "pipeline":
        raise ArtifactError(f"{artifact.path} was lowered for '{artifact.runtime}', not 'pipeline'")
    n = int(artifact.backend["num_stages"])
    if world_size != n:
        raise RunnerError(
            f"pipeline | {artifact.path} has {n} stages, so WORLD_SIZE must be {n}, got {world_size}"
        )
    if not 0 <= rank < n:
        raise RunnerError(f"pipeline | RANK must be in 0..{n - 1}, got {rank}")
    return n


def _stage_device(device: str, rank: int) -> str:
    if device.startswith("cuda") and ":" not in device:
        local = int(os.environ.get("LOCAL_RANK", rank))
        return f"cuda:{local % max(1, torch.cuda.device_count())}"
    return device


def _worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of locally spawned ranks (``python -c ...``)."""
    import argparse

    p = argparse.ArgumentParser()
    for name in (
        "artifact",
        "rank",
        "world_size",
        "addr",
        "port",
        "timeout",
        "join_timeout",
        "parent",
        "threads",
    ):
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
    except RunnerError as e:
        print(f"graphopt: error: {e}", file=sys.stderr)
        return 1
    return 0


# -------------------------------------------------------------------- runner
class PipelineRunner(Runner):
    """Rank 0 of a pipeline: hosts stage 0, starts or waits for the other ranks,
    cuts each batch into ``microbatches`` and returns the last stage's outputs."""

    name = "pipeline"

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self._host: _StageHost | None = None
        self._store: Any = None
        self._procs: list[tuple[int, subprocess.Popen, Path]] = []
        self._step = 0
        self._broken = ""
        self.address = ""

    # ----------------------------------------------------------- activation
    def _activate_impl(self) -> None:
        assert self.artifact is not None
        n = int(self.artifact.backend["num_stages"])
        opts = self.options
        device = resolve_device(opts.get("device") or self.artifact.backend.get("device", "cpu"), self.name)
        self.device = _stage_device(device, 0)
        launch = opts.get("launch") or "auto"
        if launch == "auto":
            launch = "external" if "WORLD_SIZE" in os.environ else "local"
        self._broken, self._step = "", 0
        if n > 1 and launch == "external":
            world = int(os.environ.get("WORLD_SIZE", n))
            _check_world(self.artifact, int(os.environ.get("RANK", 0)), world)
            if int(os.environ.get("RANK", 0)) != 0:
                raise RunnerError(
                    "pipeline | this process has RANK != 0: serve its stage with `graphopt serve-pipeline`"
                )
        import torch.distributed as dist

        if n > 1 and dist.is_initialized():
            raise RunnerError(
                "pipeline | this process already has a torch.distributed group; run rank 0 in its own process"
            )
        self._host = _StageHost(self.artifact, 0, n, self.device)
        if n == 1:
            return
        addr = "127.0.0.1"
        if launch == "external":
            addr = opts.get("master_addr") or os.environ.get("MASTER_ADDR") or addr
        port = opts.get("master_port") or (
            int(os.environ["MASTER_PORT"]) if launch == "external" and "MASTER_PORT" in os.environ else 0
        )
        if launch == "external" and not port:
            raise RunnerError(
                "pipeline | launch=external needs MASTER_PORT (or master_port=) so other hosts can join"
            )
        join_timeout = float(opts.get("join_timeout") or 60.0)
        try:
            self._store = dist.TCPStore(
                addr,
                port,
                is_master=True,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=join_timeout),
            )
        except Exception as e:
            raise RunnerError(
                f"pipeline | cannot listen on {addr}:{port} ({first_line(e, with_type=False)}); pick another MASTER_PORT"
            ) from None
        self.address = f"tcp://{addr}:{self._store.port}"
        try:
            if launch == "local":
                self._spawn(n, self._store.port)
            self._wait_join(n, join_timeout)
            self._host.init_group(self._store, float(opts.get("timeout") or 60.0))
        except BaseException:
            self._teardown()
            raise

    def _spawn(self, n: int, port: int) -> None:
        assert self.artifact is not None
        code = "import sys; from graphopt.runtimes.pipeline import _worker_main; sys.exit(_worker_main())"
        for rank in range(1, n):
            fd, log_path = tempfile.mkstemp(prefix=f"graphopt-pipeline-rank{rank}-", suffix=".log")
            args = [
                sys.executable,
                "-c",
                code,
                "--artifact",
                str(self.artifact.path),
                "--rank",
                str(rank),
                "--world_size",
                str(n),
                "--addr",
                "127.0.0.1",
                "--port",
                str(port),
                "--timeout",
                str(self.options.get("timeout") or 60.0),
                "--join_timeout",
                str(self.options.get("join_timeout") or 60.0),
                "--parent",
                str(os.getpid()),
                "--threads",
                str(self.options.get("threads") or ""),
            ]
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True
            )
            os.close(fd)
            self._procs.append((rank, proc, Path(log_path)))
            log.info("spawned rank %d (pid %d), log %s", rank, proc.pid, log_path)

    def _wait_join(self, n: int, join_timeout: float) -> None:
        deadline = time.monotonic() + join_timeout
        missing = list(range(1, n))
        while missing:
            missing = [r for r in missing if not self._store.check([f"{_KEY}/joined/{r}"])]
            dead = self._dead_worker()
            if dead:
                raise RunnerError(f"pipeline | {dead} before joining")
            if not missing:
                return
            if time.monotonic() > deadline:
                ranks = ", ".join(map(str, missing))
                raise RunnerError(
                    f"pipeline | rank {ranks} of {n} did not join within {join_timeout:g}s at {self.address}; "
                    f"start it with RANK=<r> WORLD_SIZE={n} MASTER_ADDR/MASTER_PORT of that address and "
                    f"`graphopt serve-pipeline {self.artifact.path if self.artifact else 'ARTIFACT'}`"
                )
            time.sleep(_POLL_S)

    def _dead_worker(self) -> str:
        for rank, proc, log_path in self._procs:
            code = proc.poll()
            if code is not None:
                tail = _log_tail(log_path)
                return f"stage {rank} (rank {rank}, pid {proc.pid}) exited with code {code}" + (
                    f": {tail}" if tail else ""
                )
        return ""

    # ------------------------------------------------------------ inference
    @property
    def microbatches(self) -> int:
        """Micro-batches per batch; may change between calls (each count gets its schedule)."""
        return int(self.options.get("microbatches") or 1)

    @microbatches.setter
    def microbatches(self, value: int) -> None:
        if int(value) < 1:
            raise RunnerError(f"pipeline | microbatches must be at least 1, got {value}")
        self.options["microbatches"] = int(value)

    def _infer_impl(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        if self._broken:
            raise RunnerError(
                f"pipeline | the pipeline stopped after an earlier failure ({self._broken}); load it again"
            )
        assert self._host is not None
        n_micro = self.microbatches
        batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
        if any(t.dim() == 0 or t.shape[0] != batch for t in inputs) or batch % n_micro:
            raise RunnerError(
                f"pipeline | batch {batch} cannot be cut into {n_micro} equal micro-batches along dim 0 "
                "of every input; pick microbatches= that divides the batch"
            )
        header = _header_of(inputs, n_micro)
        if self._host.world_size == 1:
            return _run_local(self._host.module, inputs, n_micro, self.device)
        dead = self._dead_worker()
        if dead:
            self._fail(dead)
        self._store.set(f"{_KEY}/step/{self._step}", json.dumps(header))
        try:
            out = self._host.step(header, inputs)
        except Exception as e:
            time.sleep(0.2)  # let a crashed peer's exit status settle, to name it
            self._fail(
                self._dead_worker()
                or (
                    f"rank 0 (stage 0) lost its peers ({first_line(e, with_type=False)}); a stage process died or its host "
                    "is unreachable"
                )
            )
        self._store.delete_key(f"{_KEY}/step/{self._step}")
        self._step += 1
        assert out is not None
        return out

    def _fail(self, reason: str) -> None:
        self._broken = reason
        self._teardown()
        raise RunnerError(f"pipeline | run failed: {reason}; the other stages were stopped")

    def stats(self) -> list[dict[str, Any]]:
        """Per-rank memory (RSS at start, after loading, peak) and parameter bytes."""
        if not self.is_active or self._host is None:
            raise RunnerError("pipeline | runner is not active")
        out = [self._host.stats()]
        if self._host.world_size == 1 or self._broken:
            return out
        step = self._step
        self._store.set(f"{_KEY}/step/{step}", json.dumps({"op": "stats"}))
        for rank in range(1, self._host.world_size):
            out.append(json.loads(self._store.get(f"{_KEY}/stats/{step}/{rank}")))
        self._step += 1
        return out

    # ------------------------------------------------------------ teardown
    def _deactivate_impl(self) -> None:
        if self._store is not None and not self._broken:
            try:
                self._store.set(f"{_KEY}/step/{self._step}", json.dumps({"op": "stop"}))
            except Exception as e:
                log.debug("could not send stop: %s", e)
        self._teardown()

    def _teardown(self) -> None:
        deadline = time.monotonic() + 10
        for _, proc, _ in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for _, _, log_path in self._procs:
            log_path.unlink(missing_ok=True)
        self._procs = []
        _destroy_group()
        self._store = None
        self._host = None


def _log_tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("graphopt: error:")]
    return (errors[-1] if errors else (lines[-1] if lines else ""))[:300]


def _run_local(module: torch.nn.Module, inputs: Sequence[torch.Tensor], n_micro: int, device: str) -> tuple:
    """One stage: the same micro-batching, in this process."""
    chunks = [torch.tensor_split(t.to(device), n_micro) for t in inputs]
    outs = []
    with torch.no_grad():
        for i in range(n_micro):
            outs.append(module(*(c[i] for c in chunks)))
    return tuple(torch.cat([o[j] for o in outs]) for j in range(len(outs[0])))


# ------------------------------------------------------------------- backend
class PipelineBackend(Backend):
    name = "pipeline"
    summary = (
        "pipeline stages across processes/hosts with torch.distributed (gloo/NCCL) and GPipe micro-batches"
    )
    lower_options = (
        Option("stages", int, None, "number of stages (default: the split-stages partition, else 2)"),
        Option(
            "balance",
            str,
            "params",
            "cost to balance when splitting here",
            choices=("params", "flops", "memory"),
        ),
        Option("device", str, "cpu", "cpu (gloo) or cuda (NCCL, one GPU per rank)"),
    )
    runner_options = (
        Option("microbatches", int, 1, "micro-batches per batch (GPipe); must divide the batch"),
        Option(
            "launch",
            str,
            "auto",
            "local: spawn ranks here; external: wait for `graphopt serve-pipeline` ranks",
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
    runner_class = PipelineRunner

    def versions(self) -> dict[str, str]:
        return {"backend": f"torch.distributed {torch.__version__}"}

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        device = options["device"]
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise LoweringError(f"pipeline | device must be cpu or cuda, got {device!r}")
        program = program.copy()
        positions = resolve_partition(program, options["stages"], options["balance"])
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
            "device": device.split(":")[0],
            "cuts": [order[p - 1].name for p in positions],
            "stages": info,
        }


BACKEND = register_runtime(PipelineBackend())


def lower_pipeline(
    program: Program, out_dir: str | os.PathLike[str], force: bool = False, **options: Any
) -> Artifact:
    """``graphopt.lower(program, "pipeline", ...)``, usable before the registry knows it."""
    return lower(program, "pipeline", out_dir, force=force, **options)


def run_sequential(
    out_dir: str | os.PathLike[str], inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Run every stage of a pipeline artifact one after another in this process
    (the single-process reference for what the distributed run returns)."""
    artifact = read_artifact(out_dir)
    stages = [Program.load(artifact.path / s["file"]) for s in artifact.backend["stages"]]
    return run_stages(stages, inputs)


def load_pipeline(out_dir: str | os.PathLike[str], **options: Any) -> PipelineRunner:
    """``graphopt.load(out_dir, ...)`` for a pipeline artifact."""
    runner = load(out_dir, **options)
    if not isinstance(runner, PipelineRunner):
        raise ArtifactError(f"{out_dir} is a '{runner.name}' artifact, not a pipeline")
    return runner
