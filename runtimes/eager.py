"""``eager``: run the Program's GraphModule with PyTorch; the reference runtime.

Artifact: ``program.pt2`` (``Program.save``). Runs on CUDA when lowered with
``device=cuda`` (``auto`` picks CUDA where present).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from graphopt.runtimes.torch_graph import move_graph_module, to_device

from graphopt.ir.program import Program
from graphopt.runtime import Backend, Option, Runner, resolve_device

__all__ = ["EagerBackend", "EagerRunner", "BACKEND"]


class EagerRunner(Runner):
    """Runs the saved Program's GraphModule under ``torch.no_grad``."""

    name = "eager"

    def __init__(self, *args: Any, program: Program | None = None, **options: Any):
        super().__init__(*args, **options)
        self._program = program
        self._gm: torch.fx.GraphModule | None = None

    @classmethod
    def from_program(cls, program: Program, device: str = "cpu") -> EagerRunner:
        """An in-memory runner (no artifact): the reference for comparisons; the same contract checks."""
        from graphopt.runtime.contract import dim_ranges
        from graphopt.runtime.index_ranges import index_ranges

        runner = cls(None, program.inputs, program.output_names, program=program, device=device)
        runner._dims, runner._index_ranges = dim_ranges(program), index_ranges(program)
        return runner

    def _activate_impl(self) -> None:
        device = self.options.get("device") or (
            self.artifact.manifest["backend"].get("device", "cpu") if self.artifact else "cpu"
        )
        self.device = resolve_device(device, self.name)
        if self._program is not None:
            gm = self._program.copy().gm if self.device != "cpu" else self._program.gm
        else:
            assert self.artifact is not None
            gm = Program.load(self.artifact.entry).gm
        self._gm = move_graph_module(gm, self.device) if self.device != "cpu" else gm

    def _infer_impl(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        assert self._gm is not None
        with torch.no_grad():  # not inference_mode: callers may edit the scores they get (masked_fill_)
            out = self._gm(*to_device(inputs, self.device))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _deactivate_impl(self) -> None:
        self._gm = None


class EagerBackend(Backend):
    name = "eager"
    keeps_state = True  # the loaded module updates its buffers as the user's model does
    summary = "PyTorch eager execution of the Program's GraphModule (the reference)"
    lower_options = (
        Option("device", str, "auto", "auto (CUDA where present), cpu or cuda[:N]"),
    )
    runner_options = (
        Option("device", str, None, "override the device recorded at lowering"),
    )
    runner_class = EagerRunner

    def versions(self) -> dict[str, str]:
        return {"backend": torch.__version__}

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        device = resolve_device(options["device"], self.name)
        program.save(out / "program.pt2")
        return {"entry": "program.pt2", "device": device}


BACKEND = EagerBackend()
