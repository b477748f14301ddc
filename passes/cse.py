"""cse: common subexpression elimination on side-effect-free ops."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from graphopt.passes._patterns import is_pure

from graphopt.transform.base import Pass, PassResult, register_pass

__all__ = ["CommonSubexpressionElimination"]


def _key(value: Any) -> Any:
    """A hashable key that never equates values that compute differently.

    Floats are keyed by ``repr`` so that ``0.0``/``-0.0`` stay apart and NaN
    (never equal to itself) only matches a NaN written the same way.
    """
    if isinstance(value, torch.fx.Node):
        return ("node", value)
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", id(value))  # identity only: symbolic values are not compared
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    return (type(value).__name__, value)


@register_pass
class CommonSubexpressionElimination(Pass):
    """Merge nodes that compute the same pure op on the same inputs.

    Matches: two ``call_function`` nodes with the same target, arguments and
    keyword arguments, where the op is neither impure, mutating nor random
    (``torch.Tag.nondeterministic_seeded``), and two ``get_attr`` nodes that
    read the same attribute. Produces: the later node's users read the earlier
    node. Preserves shapes. Exact. Runs to a fixpoint in one sweep because
    nodes are visited in topological order.
    Before/after: ``a = arange(s0); b = arange(s0); add(a, b)`` ->
    ``a = arange(s0); add(a, a)``.
    """

    name = "cse"
    preserves = frozenset({"shapes"})

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        graph = program.gm.graph
        seen: dict[Any, torch.fx.Node] = {}
        counts: dict[str, int] = {}
        for node in list(graph.nodes):
            if node.op == "get_attr":
                key: Any = ("get_attr", node.target)
                rule = "get-attr"
            elif is_pure(node):
                try:
                    key = (node.target, _key(node.args), _key(dict(node.kwargs)))
                    hash(key)
                except TypeError:
                    continue
                rule = "op"
            else:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            counts[rule] = counts.get(rule, 0) + 1
        return PassResult(program, modified=bool(counts), stats=counts)
