"""remove-noop: ops that return their input unchanged."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphopt.ir.fx import tensor_meta
from graphopt.transform.base import Pass, PassResult, register_pass

__all__ = ["RemoveNoop"]

aten = torch.ops.aten


def _same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    ta, tb = tensor_meta(a), tensor_meta(b)
    if ta is None or tb is None or ta.dim() != tb.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(ta.shape, tb.shape))


def _same_meta(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    ta, tb = tensor_meta(a), tensor_meta(b)
    return ta is not None and tb is not None and ta.dtype == tb.dtype and ta.device == tb.device and _same_shape(a, b)


def _identity_reshape(node: torch.fx.Node) -> bool:  # view/reshape/expand to the same shape
    return isinstance(node.args[0], torch.fx.Node) and _same_meta(node, node.args[0])


def _identity_to_copy(node: torch.fx.Node) -> bool:  # _to_copy to the same dtype/device/layout
    extra = set(node.kwargs) - {"dtype", "device", "layout"}
    return not extra and isinstance(node.args[0], torch.fx.Node) and _same_meta(node, node.args[0])


def _identity_clone(node: torch.fx.Node) -> bool:  # clone in a functional graph, default format
    return node.kwargs.get("memory_format") in (None, torch.preserve_format) and isinstance(node.args[0], torch.fx.Node)


def _full_slice(node: torch.fx.Node) -> bool:  # x[:, 0:MAX:1]
    args = list(node.args) + [None] * (5 - len(node.args))
    src, _, start, end, step = args[:5]
    if not isinstance(src, torch.fx.Node) or start not in (None, 0) or step not in (None, 1):
        return False
    return _same_shape(node, src)


def _zero_add(node: torch.fx.Node) -> bool:  # x + 0 (alpha irrelevant)
    return len(node.args) == 2 and node.args[1] == 0 and isinstance(node.args[0], torch.fx.Node) and _same_meta(node, node.args[0])


def _one_mul(node: torch.fx.Node) -> bool:  # x * 1
    return len(node.args) == 2 and node.args[1] == 1 and isinstance(node.args[0], torch.fx.Node) and _same_meta(node, node.args[0])


RULES: dict[str, tuple[tuple[object, ...], Callable[[torch.fx.Node], bool]]] = {
    "identity-view": ((aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default), _identity_reshape),
    "same-dtype-cast": ((aten._to_copy.default,), _identity_to_copy),
    "clone": ((aten.clone.default,), _identity_clone),
    "alias": ((aten.alias.default,), lambda n: isinstance(n.args[0], torch.fx.Node)),
    "full-slice": ((aten.slice.Tensor,), _full_slice),
    "add-zero": ((aten.add.Tensor, aten.sub.Tensor), _zero_add),
    "mul-one": ((aten.mul.Tensor, aten.div.Tensor), _one_mul),
}


@register_pass
class RemoveNoop(Pass):
    """Remove ops that return their input unchanged (views, clones, casts).

    Matches (one rule each): view/reshape/expand to the same shape, ``_to_copy``
    to the same dtype/device, ``clone`` (graphs are functional), ``alias``,
    a full slice ``x[0:MAX:1]``, ``x + 0``, ``x * 1``. Shapes are compared
    symbolically, so a view from ``[s0, 16]`` to ``[s0, 16]`` matches and one
    to ``[s0*16]`` does not. Requires shapes; preserves them. Exact.
    Before/after: ``y = view(x, [b, s, 32])`` with x ``[b, s, 32]`` -> ``x``.
    """

    name = "remove-noop"
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        counts: dict[str, int] = {}
        graph = program.gm.graph
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            for rule, (targets, check) in RULES.items():
                if node.target in targets and check(node):
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                    counts[rule] = counts.get(rule, 0) + 1
                    break
        return PassResult(program, modified=bool(counts), stats=counts)
