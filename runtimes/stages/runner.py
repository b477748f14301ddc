"""Rank 0 of a ``stages`` artifact: the Runner. It hosts stage 0, spawns the
other ranks here (``launch=local``) or waits for them to join from other
hosts (``launch=external``), cuts each batch into ``microbatches`` and
returns the last stage's outputs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from graphopt.runtimes.stages.host import StageHost, run_local, step_header
from graphopt.runtimes.stages.rendezvous import (
    HEARTBEAT_S,
    POLL_S,
    RUNTIME,
    artifact_identity,
    check_world,
    destroy_group,
    gloo_reason,
    identity_mismatch,
    key,
    listen,
    stage_device,
)

from graphopt.errors import RunnerError
from graphopt.ir.program import check_inputs
from graphopt.runtime import Runner, resolve_device
from graphopt.runtime.contract import check_contract

__all__ = ["StagesRunner"]

log = logging.getLogger(__name__)

_WORKER_CODE = "import sys; from graphopt.runtimes.stages.worker import worker_main; sys.exit(worker_main())"


class StagesRunner(Runner):
    """Rank 0 of a ``stages`` artifact: hosts stage 0, starts or waits for the other
    ranks, cuts each batch into ``microbatches`` and returns the last stage's outputs."""

    name = RUNTIME

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self._host: StageHost | None = None
        self._store: Any = None
        self._procs: list[tuple[int, subprocess.Popen, Path]] = []
        self._step = 0
        self._broken = ""
        self._interrupted = False  # a step was cut short (Ctrl-C, SIGTERM): the ranks sit in a collective
        self.address = ""

    # ----------------------------------------------------------- activation
    def _activate_impl(self) -> None:
        assert self.artifact is not None
        n = int(self.artifact.backend["num_stages"])
        opts = self.options
        device = resolve_device(opts.get("device") or self.artifact.backend.get("device", "cpu"), self.name)
        self.device = stage_device(device, 0)
        launch = opts.get("launch") or "auto"
        if launch == "auto":
            launch = "external" if "WORLD_SIZE" in os.environ else "local"
        self._broken, self._step, self._interrupted = "", 0, False
        if n > 1 and launch == "external":
            world = int(os.environ.get("WORLD_SIZE", n))
            check_world(self.artifact, int(os.environ.get("RANK", 0)), world)
            if int(os.environ.get("RANK", 0)) != 0:
                raise RunnerError(
                    f"{RUNTIME} | this process has RANK != 0: serve its stage with `graphopt serve-stages`"
                )
        import torch.distributed as dist

        if n > 1 and dist.is_initialized():
            raise RunnerError(
                f"{RUNTIME} | this process already has a torch.distributed group; run rank 0 in its own process"
            )
        self._host = StageHost(self.artifact, 0, n, self.device)
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
                f"{RUNTIME} | launch=external needs MASTER_PORT (or master_port=) so other hosts can join"
            )
        join_timeout = float(opts.get("join_timeout") or 60.0)
        self._store = listen(addr, port, join_timeout)
        self.address = f"tcp://{addr}:{self._store.port}"
        try:
            self._store.set(key("artifact"), json.dumps(artifact_identity(self.artifact)))
            if launch == "local":
                self._spawn(n, self._store.port)
            self._wait_join(n, join_timeout)
            self._host.init_group(self._store, float(opts.get("timeout") or 60.0))
        except BaseException:
            self._stop_workers()
            self._teardown()
            raise

    def _spawn(self, n: int, port: int) -> None:
        assert self.artifact is not None
        flags = {
            "artifact": str(self.artifact.path),
            "world_size": str(n),
            "addr": "127.0.0.1",
            "port": str(port),
            "timeout": str(self.options.get("timeout") or 60.0),
            "join_timeout": str(self.options.get("join_timeout") or 60.0),
            "parent": str(os.getpid()),
            "threads": str(self.options.get("threads") or ""),
        }
        for rank in range(1, n):
            fd, log_path = tempfile.mkstemp(prefix=f"graphopt-stages-rank{rank}-", suffix=".log")
            # the rank removes its log itself when this process dies without close()
            args = [sys.executable, "-c", _WORKER_CODE, "--rank", str(rank), "--log", log_path]
            for name, value in flags.items():
                args += [f"--{name}", value]
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True
            )
            os.close(fd)
            self._procs.append((rank, proc, Path(log_path)))
            log.info("spawned rank %d (pid %d), log %s", rank, proc.pid, log_path)

    def _wait_join(self, n: int, join_timeout: float) -> None:
        assert self.artifact is not None
        mine = artifact_identity(self.artifact)
        deadline = time.monotonic() + join_timeout
        missing = list(range(1, n))
        while missing:
            if self._store.check([key("refused")]):
                why = self._store.get(key("refused")).decode(errors="replace")
                raise RunnerError(f"{RUNTIME} | {why}; fix that rank and start both again")
            joined = [r for r in missing if self._store.check([key("joined", r)])]
            for rank in joined:
                try:
                    theirs = json.loads(self._store.get(key("joined", rank))).get("artifact")
                except (ValueError, AttributeError):
                    theirs = None  # an older graphopt's bare pid
                differs = identity_mismatch(mine, rank, theirs)
                if differs:
                    raise RunnerError(
                        f"{RUNTIME} | {differs}; copy the same artifact folder ({self.artifact.path}) to every "
                        f"host and restart rank {rank}"
                    )
            missing = [r for r in missing if r not in joined]
            dead = self._dead_worker()
            if dead:
                raise RunnerError(f"{RUNTIME} | {dead} before joining")
            if not missing:
                return
            if time.monotonic() > deadline:
                ranks = ", ".join(map(str, missing))
                raise RunnerError(
                    f"{RUNTIME} | rank {ranks} of {n} did not join within {join_timeout:g}s at {self.address}; "
                    f"start it with RANK=<r> WORLD_SIZE={n} MASTER_ADDR/MASTER_PORT of that address and "
                    f"`graphopt serve-stages {self.artifact.path}`"
                )
            time.sleep(POLL_S)

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
            raise RunnerError(f"{RUNTIME} | microbatches must be at least 1, got {value}")
        self.options["microbatches"] = int(value)

    def check_call(self, inputs: Sequence[torch.Tensor]) -> None:
        """Refuse ``inputs`` the way a call would (inputs, contract, micro-batches),
        without starting the ranks: ``serve-stages`` checks its arguments first."""
        check_inputs(self.inputs, inputs, self.name)
        check_contract(self.inputs, inputs, self._dims, self._index_ranges, self.name)
        self._check_micro(inputs)

    def _check_micro(self, inputs: Sequence[torch.Tensor]) -> None:
        n_micro = self.microbatches
        batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
        if any(t.dim() == 0 or t.shape[0] != batch for t in inputs) or batch % n_micro:
            raise RunnerError(
                f"{RUNTIME} | batch {batch} cannot be cut into {n_micro} equal micro-batches along dim 0 "
                "of every input; pick microbatches= that divides the batch"
            )

    def _infer_impl(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        with self._lock:  # threads sharing the runner take turns: every rank runs one step at a time
            try:
                return self._infer_locked(inputs)
            except Exception:
                raise
            except BaseException:  # Ctrl-C / SIGTERM mid-step: the ranks wait in a collective
                self._interrupted = True
                self._broken = self._broken or "a call was interrupted"
                raise

    def _infer_locked(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        if self._broken:
            raise RunnerError(
                f"{RUNTIME} | the run stopped after an earlier failure ({self._broken}); load it again"
            )
        assert self._host is not None
        n_micro = self.microbatches
        self._check_micro(inputs)
        header = step_header(inputs, n_micro)
        if self._host.world_size == 1:
            return run_local(self._host.module, inputs, n_micro, self.device)
        dead = self._dead_worker()
        if dead:
            self._fail(dead)
        self._store.set(key("step", self._step), json.dumps(header))
        try:
            out = self._host.step(header, inputs)
        except Exception as e:
            time.sleep(0.2)  # let a crashed peer's exit status settle, to name it
            self._fail(self._dead_worker() or self._lost_peer(gloo_reason(e)))
        self._store.delete_key(key("step", self._step))
        self._step += 1
        assert out is not None
        return out

    def _lost_peer(self, why: str) -> str:
        """Which serving rank is gone, from what it left in the store: the reason it
        failed with, else the rank whose ``alive`` counter stopped moving."""
        assert self._host is not None
        ranks = range(1, self._host.world_size)
        try:
            for rank in ranks:
                if self._store.check([key("failed", rank)]):
                    return f"rank 0 (stage 0) lost its peers: {self._store.get(key('failed', rank)).decode()}"
            before = {r: self._store.add(key("alive", r), 0) for r in ranks}
            time.sleep(4 * HEARTBEAT_S)
            gone = [r for r in ranks if self._store.add(key("alive", r), 0) == before[r]]
        except Exception as e:  # the store is this process's own; be safe all the same
            log.debug("could not read the heartbeats: %s", e)
            gone = []
        if gone:
            names = ", ".join(f"stage {r} (rank {r})" for r in gone)
            return (
                f"rank 0 (stage 0) lost its peers: {names} stopped answering ({why}); its process died or "
                "stalled, or its host is unreachable"
            )
        return f"rank 0 (stage 0) lost its peers ({why}): a stage process died or its host is unreachable"

    def _fail(self, reason: str) -> None:
        self._broken = reason
        self._stop_workers()  # they were never sent "stop" and may sit in a collective
        self._teardown()
        raise RunnerError(f"{RUNTIME} | run failed: {reason}; the other stages were stopped")

    def _stop_workers(self) -> None:
        """Tell the ranks to stop (remote ones see it once they read the store) and
        end the ones spawned here: SIGTERM, then SIGKILL after a short grace (a
        stopped or stalled process never acts on SIGTERM)."""
        if self._store is not None:
            try:
                self._store.set(key("step", self._step), json.dumps({"op": "stop"}))
            except Exception as e:
                log.debug("could not send stop: %s", e)
        alive = [proc for _, proc, _ in self._procs if proc.poll() is None]
        for proc in alive:
            proc.terminate()
        deadline = time.monotonic() + 0.5
        for proc in alive:
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stats(self) -> list[dict[str, Any]]:
        """Per-rank memory (RSS at start, after loading, peak) and parameter bytes."""
        with self._lock:  # a command of its own between steps: never in the middle of another thread's
            return self._stats_locked()

    def _stats_locked(self) -> list[dict[str, Any]]:
        if self._broken:
            raise RunnerError(
                f"{RUNTIME} | the run stopped after an earlier failure ({self._broken}); load it again"
            )
        if not self.is_active or self._host is None:
            raise RunnerError(f"{RUNTIME} | runner is not active")
        out = [self._host.stats()]
        if self._host.world_size == 1:
            return out
        dead = self._dead_worker()
        if dead:
            self._fail(dead)
        step = self._step
        self._store.set(key("step", step), json.dumps({"op": "stats"}))
        timeout = float(self.options.get("timeout") or 60.0)
        deadline = time.monotonic() + timeout
        for rank in range(1, self._host.world_size):
            name = key("stats", step, rank)
            while not self._store.check([name]):
                dead = self._dead_worker()
                if dead:
                    self._fail(dead)
                if time.monotonic() > deadline:
                    self._fail(
                        f"stage {rank} (rank {rank}) did not answer within {timeout:g}s; its process died, "
                        "stalled or its host is unreachable"
                    )
                time.sleep(0.01)
            out.append(json.loads(self._store.get(name)))
        self._step += 1
        return out

    # ------------------------------------------------------------ teardown
    def _deactivate_impl(self) -> None:
        if self._interrupted:  # the ranks sit in the interrupted step's collective: end them now
            self._stop_workers()
        elif self._store is not None and not self._broken:
            try:
                self._store.set(key("step", self._step), json.dumps({"op": "stop"}))
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
        destroy_group()
        self._store = None
        self._host = None


def _log_tail(path: Path) -> str:
    """The last ``graphopt: error:`` line of a spawned rank's log (else its last line)."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("graphopt: error:")]
    return (errors[-1] if errors else (lines[-1] if lines else ""))[:300]
