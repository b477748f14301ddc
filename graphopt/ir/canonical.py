"""Canonical forms capture leaves in the IR, so passes and exporters see one way to say a thing.

- ``addmm`` projections become ``linear``: Hugging Face's ``Conv1D`` (GPT-2's
  attention and MLP projections) computes ``view(addmm(b, view(x, [-1, k]),
  W), [..., n])`` with ``W`` stored ``[in, out]``. That is ``linear(x, W.T,
  b)``; as ``linear`` every pass written for linears (fuse-qkv, fuse-linear-act,
  quantize-int8, pruning) applies, and the ONNX graph has no ``[b*s, k]``
  reshapes for onnxscript's attention fusion to mistake for the attention
  output (its MHA rule does not check that reshape's shape and produced a
  rank-3 input to a rank-2 ``Gemm``, which ONNX Runtime refused to load).
- Views valid only for one kernel's output layout copy first
  (:mod:`graphopt.ir.layout`).
"""

from __future__ import annotations

import logging

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphopt.ir.fx import add_tensor_attr, drop_unused_attrs, fetch_attr, tensor_meta
from graphopt.ir.layout import guard_layout_views
from graphopt.ir.shapes import fill_vals

__all__ = ["canonicalize", "addmm_to_linear"]

log = logging.getLogger(__name__)

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _constant(gm: torch.fx.GraphModule, node: object) -> torch.Tensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = fetch_attr(gm, str(node.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _same_shape(shape: object, expected: list[object]) -> bool:
    return len(shape) == len(expected) and all(  # type: ignore[arg-type]
        statically_known_true(a == b) for a, b in zip(shape, expected))  # type: ignore[call-overload]


def _unflattened(addmm: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(x, out_view)`` when ``addmm`` reads ``view(x, [-1, k])`` and its only user
    views the result back to ``x``'s leading dims, else None (a plain 2-D addmm)."""
    flat = addmm.args[1]
    if not (isinstance(flat, torch.fx.Node) and flat.op == "call_function" and flat.target in _VIEWS
            and len(flat.users) == 1 and len(addmm.users) == 1):
        return None
    x, out = flat.args[0], next(iter(addmm.users))
    if not (isinstance(x, torch.fx.Node) and out.op == "call_function" and out.target in _VIEWS):
        return None
    xv, ov, av = tensor_meta(x), tensor_meta(out), tensor_meta(addmm)
    if xv is None or ov is None or av is None or xv.dim() < 2:
        return None
    if not _same_shape(ov.shape, [*xv.shape[:-1], av.shape[-1]]):
        return None
    return x, out


def addmm_to_linear(gm: torch.fx.GraphModule) -> int:
    """``[view](addmm(b, [view](x), W))`` with constant ``W [k, n]`` and ``b [n]`` -> ``linear(x, W.T, b)``.

    The transposed weight is a new constant (``<W>_t``); the old one is dropped
    when nothing else reads it. Returns how many addmms were rewritten.
    """
    graph, done, new_nodes = gm.graph, 0, []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.addmm.default or len(node.args) != 3:
            continue
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            continue
        bias, weight = _constant(gm, node.args[0]), _constant(gm, node.args[2])
        if weight is None or bias is None or weight.dim() != 2 or bias.shape != (weight.shape[1],):
            continue
        unflat = _unflattened(node)
        flat, w_node = node.args[1], node.args[2]
        x, replaced = unflat if unflat is not None else (flat, node)
        wt = add_tensor_attr(gm, f"{w_node.target}_t", weight.detach().t().contiguous(), before=node)  # type: ignore[union-attr]
        with graph.inserting_before(node):
            linear = graph.call_function(aten.linear.default, (x, wt, node.args[0]))
        linear.meta.update({k: v for k, v in node.meta.items() if k in _META_KEYS})
        replaced.replace_all_uses_with(linear)
        for dead in (replaced, node, flat) if unflat is not None else (node,):
            if isinstance(dead, torch.fx.Node) and not dead.users:
                graph.erase_node(dead)
        new_nodes.append(linear)
        done += 1
    if done:
        fill_vals(graph, new_nodes)
        drop_unused_attrs(gm)
        graph.lint()
        gm.recompile()
        log.info("rewrote %d addmm projections as linear", done)
    return done


def canonicalize(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Every canonicalization above, in order; returns what each changed."""
    return {"addmm-to-linear": addmm_to_linear(gm), "layout-views": guard_layout_views(gm)}
