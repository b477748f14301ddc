"""dce: dead code elimination."""

from __future__ import annotations

import torch.fx

from graphopt.transform.base import Pass, PassResult, register_pass

__all__ = ["DeadCodeElimination"]


def _impure(node: torch.fx.Node) -> bool:
    # runtime asserts and export's input-guard module stay: they check, not compute
    return node.is_impure() or node.op == "call_module"


@register_pass
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used (side-effect-free ops only).

    Matches: call_function and get_attr nodes with no users whose op is not
    impure (asserts, in-place ops and call_module nodes stay).
    Produces: the same graph without them; unused weights are dropped when
    the pipeline ends. Preserves shapes. Exact.
    Before/after: ``a = linear(x); b = relu(x); return b`` -> ``b = relu(x); return b``.
    """

    name = "dce"
    preserves = frozenset({"shapes"})

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        graph = program.gm.graph
        before = len(graph.nodes)
        graph.eliminate_dead_code(is_impure_node=_impure)
        removed = before - len(graph.nodes)
        return PassResult(program, modified=removed > 0, stats={"nodes-removed": removed} if removed else {})
