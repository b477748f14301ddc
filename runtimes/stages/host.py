"""One rank's stage: its saved Program, its process group and a GPipe schedule
(``torch.distributed.pipelining``) per input signature. Rank 0 (the Runner)
and every serving rank (the worker) each hold one :class:`StageHost`."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from graphopt.runtimes.stages.rendezvous import init_group

from graphopt.ir.program import Program
from graphopt.process import reset_peak_rss, rss_kb
from graphopt.runtime import Artifact

__all__ = ["StageHost", "step_header", "run_local"]

#: schedules kept per host (one per input shapes + micro-batch count)
_MAX_SCHEDULES = 8


class _StageModule(torch.nn.Module):
    """A stage GraphModule whose outputs are a tuple of contiguous tensors (for send)."""

    def __init__(self, gm: torch.nn.Module):
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.gm(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(t.contiguous() for t in out)


class StageHost:
    """One rank: its stage module, the process group and a GPipe schedule per
    input signature (shapes + micro-batch count)."""

    def __init__(self, artifact: Artifact, rank: int, world_size: int, device: str):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        for module in ("torch._export.serde.serialize", "torch.distributed.pipelining"):
            importlib.import_module(module)  # so the RSS below does not count loader code
        reset_peak_rss()
        self.rss_start_mb = rss_kb()[0] / 1024
        program = Program.load(artifact.file(artifact.backend["stages"][rank]["file"]))
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
        self.ctrl = init_group(store, self.rank, self.world_size, self.device, timeout_s)

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
        if len(self._schedules) >= _MAX_SCHEDULES:
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


def step_header(inputs: Sequence[torch.Tensor], n_micro: int, op: str = "run") -> dict[str, Any]:
    """Rank 0's command for one batch: micro-batch count and input shapes/dtypes."""
    return {
        "op": op,
        "microbatches": n_micro,
        "inputs": [[list(t.shape), str(t.dtype).replace("torch.", "")] for t in inputs],
    }


def run_local(module: torch.nn.Module, inputs: Sequence[torch.Tensor], n_micro: int, device: str) -> tuple:
    """One stage: the same micro-batching, in this process."""
    chunks = [torch.tensor_split(t.to(device), n_micro) for t in inputs]
    outs = []
    with torch.no_grad():
        for i in range(n_micro):
            outs.append(module(*(c[i] for c in chunks)))
    return tuple(torch.cat([o[j] for o in outs]) for j in range(len(outs[0])))
