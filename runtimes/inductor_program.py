"""The Program as Inductor gets it: checked, re-exported, linear+activation unfused."""

from __future__ import annotations

import copy

import torch
from graphopt.runtimes.torch_graph import move_graph_module

from graphopt.errors import LoweringError
from graphopt.ir.program import Program

__all__ = ["check_weight_zero_points", "export_on", "unfuse_linear_act"]


def check_weight_zero_points(program: Program) -> None:
    """Refuse int8 weights with per-channel zero points that are not 0
    (``quantize-int8{symmetric_weights=false}``): Inductor's x86 int8 lowering (oneDNN
    ``qlinear``) assumes symmetric weights and drops them (measured: 0.137 off the Program
    on a Linear(16, 8), ~15x its quantization error, silently)."""
    params = program.parameter_tensors()
    for node in program.gm.graph.nodes:
        if node.op != "call_function" or "dequantize_per_channel" not in str(node.target) or len(node.args) < 3:
            continue
        zp = node.args[2]
        value = params.get(str(zp.target)) if isinstance(zp, torch.fx.Node) and zp.op == "get_attr" else None
        if isinstance(value, torch.Tensor) and bool(value.ne(0).any()):
            raise LoweringError(
                f"inductor | {program.name} has int8 weights with per-channel zero points (quantize-int8"
                "{symmetric_weights=false}), which Inductor's x86 int8 kernels ignore; quantize with "
                "symmetric_weights=true (the default), or lower it for eager or onnxruntime")


def export_on(program: Program, device: str) -> torch.export.ExportedProgram:
    """``program.export()`` with weights, constants and example inputs on ``device``."""
    program = unfuse_linear_act(program)
    if device == "cpu":
        return program.export()
    gm = move_graph_module(program.copy().gm, device)
    args = tuple(t.to(device) for t in program.sample_inputs())
    dims = tuple({d: torch.export.Dim.AUTO for d in s.dynamic} or None for s in program.inputs)
    return torch.export.export(gm, args, dynamic_shapes=dims, strict=False)


def unfuse_linear_act(program: Program) -> Program:
    """``_addmm_activation(b, x, w)`` (fuse-linear-act's one-kernel linear+relu/gelu for
    eager and TorchScript) back to ``act(addmm(b, x, w))`` for Inductor, whose own
    pattern fuses that into oneDNN's linear with prepacked weights and the activation
    as a post-op; the ATen ``_addmm_activation`` it would call instead has neither
    (bf16 on CPU even runs the gelu as a separate pass). Measured on bert4rec:base
    bf16, batch 1, seq 64, 1 thread: 2.23x -> 2.60x eager; batch 32 unchanged.
    The weights stay shared with ``program`` (only the graph is copied)."""
    aten = torch.ops.aten
    if not any(n.target is aten._addmm_activation.default for n in program.gm.graph.nodes):
        return program
    graph = copy.deepcopy(program.gm.graph)
    for node in [n for n in graph.nodes if n.target is aten._addmm_activation.default]:
        bias, x, w = node.args[:3]
        kwargs = {k: v for k, v in node.kwargs.items() if k in ("beta", "alpha")}
        act = aten.gelu.default if node.kwargs.get("use_gelu", False) else aten.relu.default
        with graph.inserting_before(node):
            mm = graph.call_function(aten.addmm.default, (bias, x, w), kwargs)
            out = graph.call_function(act, (mm,))
        for new in (mm, out):
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    gm = torch.fx.GraphModule(program.gm, graph)
    return Program(gm, copy.deepcopy(program.inputs), program.output_names, name=program.name,
                   example_inputs=program.example_inputs, pipeline=program.pipeline, meta=program.meta)
