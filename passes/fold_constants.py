"""fold-constants: evaluate parameter-only subgraphs once and store the result."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
from graphopt.passes._patterns import copy_meta, is_pure

from graphopt.ir.fx import add_tensor_attr, fetch_attr, target_name, where
from graphopt.transform.base import Option, Pass, PassResult, register_pass
from graphopt.transform.state import mutated_attrs

__all__ = ["FoldConstants"]

log = logging.getLogger(__name__)


def _has_symbols(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return any(not isinstance(s, int) for s in val.shape)
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@register_pass
class FoldConstants(Pass):
    """Evaluate subgraphs that read only parameters, buffers and literals.

    Matches: pure ``call_function`` nodes (no side effects, no randomness)
    whose every input is a ``get_attr``, a literal, or another such node,
    e.g. ``arange(16)``, ``zeros([])``, ``t(weight)``, ``expand(buffer, [1, -1])``.
    Anything that reads a placeholder or a symbolic size (``sym_size``,
    ``s0 * 3``) is never folded, so dynamic shapes stay dynamic. A buffer the
    graph mutates (``self.count.add_(1)``, kept by torch.export as
    ``copy_(count, ...)``) is state, not a constant: nothing reading it folds.
    Produces: one new ``get_attr`` per folded value that a non-constant node
    reads; the constant subgraph is erased. A fold whose result would exceed
    its constant inputs by more than ``max_growth_bytes`` (e.g. an expand to
    a big shape) is declined. Preserves shapes. Exact (computed by the same
    kernels, once).
    Before/after: ``t = t(slice(w, 0, 0, 51)); mm(x, t)`` -> ``mm(x, _folded_t)``.
    """

    name = "fold-constants"
    options = (
        Option("max_growth_bytes", int, 1 << 20,
               "decline folds whose result is bigger than their constant inputs by more than this",
               check=lambda v: None if v >= 0 else "must be >= 0"),
    )
    preserves = frozenset({"shapes"})

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm = program.gm
        graph = gm.graph
        values: dict[torch.fx.Node, Any] = {}
        sources: dict[torch.fx.Node, frozenset[torch.fx.Node]] = {}  # get_attr ancestors
        mutated = mutated_attrs(graph)
        for node in graph.nodes:
            if node.op == "get_attr":
                if str(node.target) in mutated:  # state the graph updates (a step counter): not constant
                    continue
                value = fetch_attr(gm, str(node.target))
                if isinstance(value, torch.Tensor):
                    values[node] = value
                    sources[node] = frozenset({node})
                continue
            if not self._foldable(node, values):
                continue
            args = torch.fx.node.map_arg(node.args, lambda n: values[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
            try:
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
            except Exception as e:  # an op that cannot run eagerly here is simply left alone
                log.debug("fold-constants: %s not evaluated: %s", node.name, e)
                continue
            sources[node] = frozenset().union(*(sources[a] for a in node.all_input_nodes))

        counts: dict[str, int] = {}
        declined: list[str] = []
        folded_bytes = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node not in values:
                continue
            value = values[node]
            live_users = [u for u in node.users if u not in values or u.op == "output"]
            if not live_users or not isinstance(value, torch.Tensor):
                continue
            # weights read only by the constant subgraph are freed; others stay alive
            freed = sum(
                _nbytes(values[g]) for g in sources.get(node, ()) if all(u in values for u in g.users)
            )
            if _nbytes(value) - freed > self.max_growth_bytes:
                declined.append(
                    f"{where(node)}: folding {target_name(node.target)} would store {_nbytes(value):,} bytes "
                    f"and free {freed:,}; raise max_growth_bytes to allow it"
                )
                continue
            const = add_tensor_attr(gm, f"_folded_{node.name}", value.contiguous().clone(), before=node)
            copy_meta(const, node)
            for user in live_users:
                user.replace_input_with(node, const)
            op = target_name(node.target).replace("aten.", "").split(".")[0]
            counts[op] = counts.get(op, 0) + 1
            folded_bytes += _nbytes(value)
        if counts:
            _erase_dead(graph, set(values))
        notes = [f"stored {folded_bytes:,} bytes of folded constants"] if counts else []
        return PassResult(program, modified=bool(counts), stats=counts, declined=declined, notes=notes)

    @staticmethod
    def _foldable(node: torch.fx.Node, values: dict[torch.fx.Node, Any]) -> bool:
        if not is_pure(node) or not isinstance(node.target, torch._ops.OpOverload):
            return False
        if _has_symbols(node.meta.get("val")):
            return False
        return all(a in values for a in node.all_input_nodes)


def _erase_dead(graph: torch.fx.Graph, candidates: set[torch.fx.Node]) -> None:
    """Erase now-unused constant nodes (call_function ones; get_attrs go to dce)."""
    for node in reversed(list(graph.nodes)):
        if node in candidates and node.op == "call_function" and not node.users:
            graph.erase_node(node)
