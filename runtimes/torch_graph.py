"""GraphModule preparation shared by the torch-based runtimes (eager, TorchScript).

* :func:`plain_graph_module` turns the unlifted ``torch.export`` module (pytree
  codegen, ``_guards_fn`` call, ``_assert_tensor_metadata`` checks) into a plain
  GraphModule with positional inputs and a tuple output, the form
  ``torch.jit.script`` accepts.
* :func:`move_graph_module` moves weights *and* the ``device=`` constants that
  ``torch.export`` bakes into ``arange``/``zeros``/... calls.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx

from graphopt.ir.fx import fetch_attr

__all__ = ["plain_graph_module", "move_graph_module", "to_device"]

log = logging.getLogger(__name__)

_DROP = {torch.ops.aten._assert_tensor_metadata.default}
for _name in ("_assert_scalar", "sym_constrain_range_for_size", "_assert_async"):
    _packet = getattr(torch.ops.aten, _name, None)
    if _packet is not None:
        _DROP.update(getattr(_packet, o) for o in _packet.overloads())


def plain_graph_module(gm: torch.fx.GraphModule, *, overload_packets: bool = False) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` with default codegen, no guard/assert nodes.

    ``overload_packets=True`` retargets ``aten.x.default`` to ``aten.x`` so
    TorchScript picks the overload from the argument types.
    """
    gm = copy.deepcopy(gm)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and "guards" in str(node.target):
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _DROP and not node.users:
            graph.erase_node(node)
        elif overload_packets and node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
    graph._codegen = torch.fx.graph.CodeGen()
    graph.eliminate_dead_code()
    out = torch.fx.GraphModule(gm, graph)
    out.recompile()
    return out


def move_graph_module(gm: torch.fx.GraphModule, device: str) -> torch.fx.GraphModule:
    """Move ``gm`` to ``device`` in place: parameters, buffers, plain tensor
    attributes and ``device=`` keyword constants of call_function nodes."""
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())  # match tensors' cuda:N
    gm.to(target)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor) and value.device != target and not isinstance(
                value, torch.nn.Parameter
            ):
                owner, _, leaf = node.target.rpartition(".")
                mod = gm.get_submodule(owner) if owner else gm
                setattr(mod, leaf, value.to(target))
        elif node.op == "call_function" and isinstance(node.kwargs.get("device"), torch.device):
            if node.kwargs["device"] != target:
                node.kwargs = {**node.kwargs, "device": target}
    gm.recompile()
    return gm


def to_device(inputs: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    target = torch.device(device)
    return [t if t.device == target else t.to(target, non_blocking=True) for t in inputs]
