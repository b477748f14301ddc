"""``torchscript``: ``torch.jit.script`` + ``torch.jit.freeze`` of the Program's graph.

Why script, not trace: ``torch.jit.trace`` of a ``torch.export`` GraphModule
bakes in every shape (``aten.sym_size`` returns Python ints while tracing, so
``arange``/``view`` sizes become constants and the artifact only runs at the
traced batch/sequence length). Scripting the plain GraphModule keeps
``aten::sym_size`` as a graph op, so the artifact is shape-generic; the tests
run it at two batch sizes and two sequence lengths.

TorchScript is deprecated upstream; its warnings are silenced inside graphopt.
Artifact: ``model.ts`` (``torch.jit.save`` of the frozen module).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from graphopt.runtimes.torch_graph import move_graph_module, plain_graph_module, to_device

from graphopt.ir.program import Program
from graphopt.runtime import Backend, Option, Runner, resolve_device

__all__ = ["TorchScriptBackend", "TorchScriptRunner", "BACKEND", "script_program"]


def script_program(program: Program, device: str = "cpu", optimize: bool = False) -> torch.jit.ScriptModule:
    """Script + freeze the Program's graph (shape-generic); optionally
    ``optimize_for_inference``."""
    gm = plain_graph_module(program.gm, overload_packets=True)
    if device != "cpu":
        move_graph_module(gm, device)
    gm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(gm)
        frozen = torch.jit.freeze(scripted.eval())
        if optimize:
            frozen = torch.jit.optimize_for_inference(frozen)
    return frozen


class TorchScriptRunner(Runner):
    name = "torchscript"

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self._module: torch.jit.ScriptModule | None = None

    def _activate_impl(self) -> None:
        assert self.artifact is not None
        self.device = resolve_device(self.artifact.manifest["backend"].get("device", "cpu"), self.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._module = torch.jit.load(str(self.artifact.entry), map_location=self.device)

    def _infer_impl(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        assert self._module is not None
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self._module(*to_device(inputs, self.device))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _deactivate_impl(self) -> None:
        self._module = None


class TorchScriptBackend(Backend):
    name = "torchscript"
    keeps_state = True
    summary = "torch.jit.script + freeze of the graph (shape-generic; TorchScript is deprecated upstream)"
    lower_options = (
        Option("device", str, "auto", "auto (CUDA where present), cpu or cuda[:N]"),
        Option("optimize", bool, False, "also run torch.jit.optimize_for_inference"),
    )
    runner_class = TorchScriptRunner

    def versions(self) -> dict[str, str]:
        return {"backend": torch.__version__}

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        device = resolve_device(options["device"], self.name)
        module = script_program(program, device, options["optimize"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(module, str(out / "model.ts"))
        return {"entry": "model.ts", "device": device, "method": "script+freeze"}


BACKEND = TorchScriptBackend()
