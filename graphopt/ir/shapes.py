"""Shape inference for single nodes: ``meta["val"]`` from the inputs' values.

A pass that creates or edits a node calls :func:`infer_val` (or
:func:`fill_vals` for many) so that the graph keeps fake tensors with the
Program's symbolic sizes on every node. The op runs under the graph's fake
mode: the one the inputs' fake tensors belong to, or, when only real
constants feed the node (a dequantize of an int8 buffer), the mode of the
graph's placeholders. Real tensors are converted with static shapes. The whole
graph is re-propagated by the ``shapes`` analysis instead
(:func:`graphopt.transform.analysis.propagate_shapes`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.node import map_arg
from torch.utils._pytree import tree_leaves, tree_map

from graphopt.errors import GraphoptError
from graphopt.ir.fx import fetch_attr

__all__ = ["graph_fake_mode", "infer_val", "fill_vals", "fake_call"]


def graph_fake_mode(graph: torch.fx.Graph) -> FakeTensorMode | None:
    """The fake mode of the graph's placeholders' ``meta["val"]``, if any."""
    return detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])


def _input_value(node: torch.fx.Node) -> tuple[bool, Any]:
    """(found, value) of an input node: its ``meta["val"]``, or a ``get_attr``'s tensor."""
    if "val" in node.meta:
        return True, node.meta["val"]
    if node.op == "get_attr" and node.graph.owning_module is not None:
        return True, fetch_attr(node.graph.owning_module, str(node.target))
    return False, None


_QUANTIZE_OPS = (
    "quantized_decomposed.quantize_per_tensor.default",
    "quantized_decomposed.quantize_per_tensor.tensor",
    "quantized_decomposed.quantize_per_channel.default",
)


def fake_call(target: Any, args: Any, kwargs: Any) -> Any:
    """``target(*args, **kwargs)`` on fake values (call under the fake mode).

    torch's meta kernels of the quantize ops convert a bf16 input with
    ``input.to(float32)``, which reads the sizes as ints: every symbol of the
    input gets specialised to its example value (``seq == 16``), in the ShapeEnv
    that every copy of the captured Program shares. Their output is the
    input's shape in the target dtype, written here without reading the sizes.
    ``baddbmm``'s meta kernel fails on symbolic sizes (``self.expand``): its
    decomposition computes the same value and shape.
    """
    if str(target) in _QUANTIZE_OPS and isinstance(args[0], FakeTensor):
        dtype = kwargs.get("dtype", args[-1] if args and isinstance(args[-1], torch.dtype) else None)
        if isinstance(dtype, torch.dtype):
            return torch.empty_like(args[0], dtype=dtype)
    if target is torch.ops.aten.baddbmm.default:  # its meta kernel expands with symbolic sizes and fails
        return torch._decomp.decomposition_table[target](*args, **kwargs)  # (nn.MultiheadAttention, dynamic)
    return target(*args, **kwargs)


def infer_val(node: torch.fx.Node) -> bool:
    """Set ``node.meta["val"]`` by running its target on its inputs' values under fake mode.

    Returns False, and leaves the metadata alone, when an input has no value or
    no fake mode is found (neither among the inputs nor on the placeholders).
    Errors raised by the op's fake kernel propagate.
    """
    missing = False

    def value(arg: torch.fx.Node) -> Any:
        nonlocal missing
        found, val = _input_value(arg)
        missing = missing or not found
        return val

    args = map_arg(node.args, value)
    kwargs = map_arg(node.kwargs, value)
    if missing:
        return False
    mode = detect_fake_mode([v for v in tree_leaves((args, kwargs)) if isinstance(v, FakeTensor)])
    if mode is None:  # only real constants in: borrow the graph's mode from its placeholders
        mode = graph_fake_mode(node.graph)
    if mode is None:
        return False

    def fake(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor):
            return mode.from_tensor(v, static_shapes=True)
        return v

    args, kwargs = tree_map(fake, (args, kwargs))
    allow = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # python-level kernels (quantized_decomposed) may hold real constants
    try:
        with mode:
            node.meta["val"] = fake_call(node.target, args, kwargs)
    finally:
        mode.allow_non_fake_inputs = allow
    return True


def fill_vals(graph: torch.fx.Graph, nodes: Iterable[torch.fx.Node]) -> None:
    """:func:`infer_val` for each call_function node of ``nodes`` still in ``graph``,
    in graph order (so a node's new inputs are filled before it).

    Raises GraphoptError naming the first node whose value cannot be inferred.
    """
    wanted = set(nodes)
    for node in graph.nodes:
        if node in wanted and node.op == "call_function" and not infer_val(node):
            raise GraphoptError(f"{node.name}: could not infer its shape; an input lacks meta['val']")
