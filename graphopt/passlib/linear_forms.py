"""GEMMs with a constant weight, written as ``aten.linear`` so quantizers see one form.

Capture and earlier passes leave constant-weight GEMMs in several spellings:

- ``_addmm_activation(b, x, t(W))`` from ``fuse-linear-act`` (linear + relu/gelu);
- ``addmm(b, x, W)`` from Hugging Face's ``Conv1D`` (GPT-2: ``W`` is ``[in, out]``);
- ``mm(x, W)`` / ``matmul(x, W)`` from hand-written layers (``x @ self.weight``).

:func:`as_linears` rewrites each into ``linear(x, W', b)`` (+ ``relu``/``gelu``
where the fused op applied one), exactly (same products and sums; ``W'`` is the
stored transpose when the weight is ``[in, out]``). The int8 lowerings then
match one form: Inductor's x86 int8 patterns expect ``dq -> linear``, and
fuse the activation back into ``onednn.qlinear_pointwise`` as a post-op.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from graphopt.ir.fx import add_tensor_attr, fetch_attr, matches_skip, module_path, tensor_meta
from graphopt.ir.shapes import infer_val

__all__ = ["as_linears", "LINEAR_LIKE"]

aten = torch.ops.aten

#: the ops :func:`as_linears` rewrites
LINEAR_LIKE = (aten._addmm_activation.default, aten.addmm.default, aten.mm.default, aten.matmul.default)

_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _constant(gm: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = fetch_attr(gm, str(node.target))
        if isinstance(value, torch.Tensor):
            return value
    return None


def _transposed_weight(gm: torch.fx.GraphModule, node: Any) -> tuple[torch.fx.Node | None, str]:
    """For a ``[in, out]`` GEMM operand: the ``get_attr`` of its ``[out, in]`` weight
    (the argument of ``t``/``permute(.., [1, 0])``, else None with a reason)."""
    if not isinstance(node, torch.fx.Node):
        return None, "weight is not a tensor"
    if node.op == "call_function" and (
        node.target in (aten.t.default, aten.numpy_T.default)
        or (node.target is aten.permute.default and list(node.args[1]) == [1, 0])
        or (node.target is aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1])
    ):
        inner = node.args[0]
        value = _constant(gm, inner)
        if value is not None and value.dim() == 2:
            return inner, ""  # type: ignore[return-value]
        return None, "weight is computed, not a constant"
    value = _constant(gm, node)
    if value is None:
        return None, "weight is computed, not a constant"
    if value.dim() != 2:
        return None, f"weight has rank {value.dim()}"
    return None, "stored [in, out]"


def _rewrite_one(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str]:
    """Rewrite ``node`` into linear (+act); (kind, "") when done, (None, reason) when declined."""
    graph = gm.graph
    target = node.target
    if target is aten._addmm_activation.default:
        bias, x, wt = node.args[:3]
        act = "gelu" if node.kwargs.get("use_gelu", node.args[5] if len(node.args) > 5 else False) else "relu"
    elif target is aten.addmm.default:
        bias, x, wt = node.args[:3]
        act = None
    else:  # mm / matmul
        x, wt = node.args[:2]
        bias, act = None, None
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or (
        target in (aten._addmm_activation.default, aten.addmm.default) and any(a != 1 for a in node.args[3:5])
    ):
        return None, "scaled (beta/alpha != 1)"
    wval = tensor_meta(wt)
    if wval is None or wval.dim() != 2:
        return None, "weight is not 2-D"
    bval = tensor_meta(bias) if bias is not None else None
    if bias is not None and (bval is None or bval.dim() != 1):
        return None, "bias is not a 1-D vector"
    weight, why = _transposed_weight(gm, wt)
    with graph.inserting_before(node):
        if weight is None:
            if why != "stored [in, out]":
                return None, why
            # the weight is stored [in, out] (Conv1D, x @ W): keep its transpose as the constant
            value = _constant(gm, wt)
            assert value is not None
            weight = add_tensor_attr(gm, str(wt.target).replace(".", "_") + "_t",  # type: ignore[union-attr]
                                     value.t().contiguous(), before=node)
        linear = graph.call_function(aten.linear.default, (x, weight, bias) if bias is not None else (x, weight))
        out = linear
        if act is not None:
            gelu_kind = "none" if (tensor_meta(node) is None or tensor_meta(node).device.type == "cpu") else "tanh"  # type: ignore[union-attr]
            out = (graph.call_function(aten.gelu.default, (linear,), {"approximate": gelu_kind}) if act == "gelu"
                   else graph.call_function(aten.relu.default, (linear,)))
    for new in dict.fromkeys((linear, out)):  # in graph order: gelu reads the linear's value
        for key in _META_KEYS:
            if key in node.meta:
                new.meta[key] = node.meta[key]
        infer_val(new)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    if isinstance(wt, torch.fx.Node) and not wt.users and wt.op == "call_function":
        graph.erase_node(wt)
    return str(target.overloadpacket.__name__), ""  # type: ignore[union-attr]


def as_linears(gm: torch.fx.GraphModule, skip: Sequence[str] = ()) -> tuple[dict[str, int], list[str]]:
    """Rewrite every constant-weight GEMM of :data:`LINEAR_LIKE` into ``aten.linear``.

    Returns ``op -> count`` of rewrites and ``"node: why"`` for the GEMMs left
    alone (a computed weight, e.g. attention's ``q @ k.T``, is one). Nodes whose
    module path or name matches a ``skip`` fnmatch pattern are left as they are.
    Exact. The graph is linted and recompiled when anything changed.
    """
    counts: collections.Counter[str] = collections.Counter()
    declined: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_LIKE:
            continue
        if matches_skip(node, skip):
            continue
        xval = tensor_meta(node.args[1] if node.target in (aten._addmm_activation.default, aten.addmm.default)
                           else node.args[0])
        if xval is None or xval.dtype != torch.float32:
            declined.append(f"{node.name}: input is not fp32")
            continue
        kind, why = _rewrite_one(gm, node)
        if kind is None and why.startswith("weight is computed"):
            continue  # an activation x activation GEMM: find_linears says so
        if kind is None:
            label = node.target.overloadpacket.__name__
            declined.append(f"{node.name} ({module_path(node) or label}): {label} {why}, stays float")
        else:
            counts[kind] += 1
    if counts:
        gm.graph.lint()
        gm.recompile()
    return dict(counts), declined
