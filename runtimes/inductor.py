"""``inductor``: an AOTInductor package compiled from the re-exported Program.

``torch._inductor.aoti_compile_and_package(program.export(), ...)`` with
``freezing`` (weights folded into the compiled code) and the Program's
dynamic dims kept symbolic, so one package serves every batch size and
sequence length (no recompile per shape). Compiling is slow (tens of seconds
for a tiny model on 2 cores, minutes for base models); loading is fast.
This is the fastest CPU path for bf16 and oneDNN int8.

Artifact: ``model.pt2`` (the AOTI package). Runs on CUDA when lowered with
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

__all__ = ["InductorBackend", "InductorRunner", "BACKEND", "export_on"]


def export_on(program: Program, device: str) -> torch.export.ExportedProgram:
    """``program.export()`` with weights, constants and example inputs on ``device``."""
    if device == "cpu":
        return program.export()
    gm = move_graph_module(program.copy().gm, device)
    args = tuple(t.to(device) for t in program.sample_inputs())
    dims = tuple({d: torch.export.Dim.AUTO for d in s.dynamic} or None for s in program.inputs)
    return torch.export.export(gm, args, dynamic_shapes=dims, strict=False)


class InductorRunner(Runner):
    name = "inductor"

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self._model: Any = None

    def _activate_impl(self) -> None:
        import torch._inductor

        assert self.artifact is not None
        self.device = resolve_device(self.artifact.manifest["backend"].get("device", "cpu"), self.name)
        self._model = torch._inductor.aoti_load_package(str(self.artifact.entry))

    def _infer_impl(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        with torch.inference_mode():
            out = self._model(*(t.contiguous() for t in to_device(inputs, self.device)))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _deactivate_impl(self) -> None:
        self._model = None


class InductorBackend(Backend):
    name = "inductor"
    summary = "AOTInductor package (torch._inductor.aoti_compile_and_package), frozen weights, dynamic batch/seq"
    lower_options = (
        Option("device", str, "auto", "auto (CUDA where present), cpu or cuda[:N]"),
        Option("freezing", bool, True, "fold weights into the compiled graph"),
        Option("max_autotune", bool, False, "autotune GEMM/conv kernels (much slower compile)"),
    )
    runner_class = InductorRunner

    def unavailable_reason(self) -> str | None:
        import torch._inductor

        if not hasattr(torch._inductor, "aoti_compile_and_package"):
            return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package"
        return None

    def versions(self) -> dict[str, str]:
        return {"backend": torch.__version__}

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        import torch._inductor

        device = resolve_device(options["device"], self.name)
        ep = export_on(program, device)
        configs = {"freezing": options["freezing"], "max_autotune": options["max_autotune"]}
        # Inductor freezes only when grad is off (compile_fx checks torch.is_grad_enabled()): without
        # no_grad "freezing" is silently ignored, weights stay graph inputs, and int8 weights are
        # dequantized on every call instead of prepacked for oneDNN's qlinear
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(out / "model.pt2"), inductor_configs=dict(configs))
        return {"entry": "model.pt2", "device": device, "inductor_configs": configs}


BACKEND = InductorBackend()
