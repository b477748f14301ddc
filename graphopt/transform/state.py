"""State a Program updates when it runs (a step counter, a running statistic).

torch.export keeps ``self.count.add_(1)`` as ``add = add(count, 1); copy_(count, add)``
on a ``get_attr``: running the Program advances the buffer. :func:`mutated_attrs`
names those attributes (fold-constants must not treat them as constants) and
:func:`preserved_state` restores them after a run graphopt makes on its own
(optimize's reference and final check, verify-each), so those runs neither
leave the state advanced nor see a different state before and after a pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx

from graphopt.ir.fx import fetch_attr
from graphopt.ir.value_ops import aliases_first_arg

__all__ = ["mutated_attrs", "preserved_state", "root_attr"]


def root_attr(node: Any) -> Any:
    """The get_attr a (chain of) view ops reads, else None."""
    seen = 0
    while isinstance(node, torch.fx.Node) and seen < 64:
        if node.op == "get_attr":
            return node
        if not aliases_first_arg(node):  # not a view of (or a write into) its first argument
            return None
        node = node.args[0]
        seen += 1
    return None


def mutated_attrs(graph: torch.fx.Graph) -> set[str]:
    """Targets of the get_attrs that an op of ``graph`` writes in place (``copy_``,
    ``add_``, ``index_put_``: any argument its schema marks as written), directly
    or through a view."""
    mutated: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            root = root_attr(value)
            if root is not None:
                mutated.add(str(root.target))
    return mutated


@contextmanager
def preserved_state(program: Any) -> Iterator[None]:
    """Run the body, then put back every tensor the Program's graph mutates."""
    saved = []
    for target in sorted(mutated_attrs(program.gm.graph)):
        try:
            tensor = fetch_attr(program.gm, target)
        except AttributeError:
            continue
        if isinstance(tensor, torch.Tensor):
            saved.append((tensor, tensor.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
