"""Upper bounds on dynamic dims that position lookups imply, where torch.export proves none.

A learned position table of N rows indexed by ``arange(seq)`` (GPT-2's ``wpe``,
BERT's ``position_embeddings``, a hand-written ``pos(torch.arange(T))``) or by
RoBERTa's ``cumsum(ids != pad) * (ids != pad) + pad`` only works for ``seq`` up
to about N, yet export adds no guard for it: an index is not a shape. Beyond
it, eager raises, ONNX Runtime's Gather reads past the table, and AOTInductor
aborts the serving process. :func:`position_bounds` finds those bounds by a
small value-range analysis over the integer tensors of the graph, with ranges
as sympy expressions of the dynamic sizes:

- ``arange(end)`` / ``arange(start, end[, 1])`` hold ``[start, end - 1]``;
- comparisons hold ``[0, 1]``; ``cumsum`` of values in ``[0, h]`` along a dim
  of size ``d`` holds ``[0, h * d]``;
- ``add``/``sub``/``mul`` of ranged tensors or constants (``mul`` of
  non-negative ranges only), view-like ops and integer casts carry the range.

An ``embedding`` (or ``index_select``/``index`` on dim 0) of a table with
``rows`` rows whose indices' upper bound is ``a * s + b`` in one dynamic size
``s`` (``a > 0``) bounds that size's label to ``(rows - 1 - b) // a``.
:func:`graphopt.runtime.contract.dim_ranges` takes the bound into the
contract, so the runner refuses a longer sequence in one line on every runtime.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx

from graphopt.ir.fx import op_name
from graphopt.ir.program import Program
from graphopt.ir.value_ops import CASTS, SAME_VALUES, is_full_slice

__all__ = ["position_bounds"]

#: ops that keep their first argument's values (positions move, values do not; a slice that keeps
#: only some of them would make the bound too tight, so only a full slice carries it)
_CARRY = SAME_VALUES | CASTS | {"long", "int"}
_COMPARE = {"ne", "eq", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not"}
Range = tuple[sympy.Expr, sympy.Expr]


def _expr(value: Any) -> sympy.Expr | None:
    """A Python int, a SymInt or a node computing one, as a sympy expression."""
    if isinstance(value, torch.fx.Node):
        value = value.meta.get("val")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    return None


def _nonneg(e: sympy.Expr) -> bool:
    return e.is_number and e >= 0 or bool(e.is_nonnegative)


def _operand(value: Any, ranges: dict[torch.fx.Node, Range]) -> Range | None:
    if isinstance(value, torch.fx.Node) and value in ranges:
        return ranges[value]
    if isinstance(value, torch.fx.Node) and isinstance(value.meta.get("val"), torch.Tensor):
        return None
    e = _expr(value)
    return (e, e) if e is not None else None


def _arange(node: torch.fx.Node) -> Range | None:
    args = list(node.args)
    if len(args) == 1:
        start, end, step = 0, args[0], 1
    elif len(args) in (2, 3):
        start, end, step = args[0], args[1], args[2] if len(args) == 3 else 1
    else:
        return None
    lo, hi, st = _expr(start), _expr(end), _expr(step)
    if lo is None or hi is None or st != 1:
        return None
    return lo, hi - 1


def _range(node: torch.fx.Node, ranges: dict[torch.fx.Node, Range]) -> Range | None:
    if node.op != "call_function" or not node.args:
        return None
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point or val.dtype.is_complex:
        return None
    name = op_name(node)
    if name == "arange":
        return _arange(node)
    if name in _COMPARE or val.dtype == torch.bool:
        return sympy.Integer(0), sympy.Integer(1)
    first = _operand(node.args[0], ranges)
    if name in _CARRY or is_full_slice(node):
        return first
    if name == "cumsum" and first is not None and len(node.args) > 1 and _nonneg(first[0]):
        src = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        size = _expr(src.shape[int(node.args[1])]) if isinstance(src, torch.Tensor) else None
        return (sympy.Integer(0), first[1] * size) if size is not None else None
    if name in ("add", "sub", "mul") and len(node.args) >= 2:
        second = _operand(node.args[1], ranges)
        alpha = node.kwargs.get("alpha", 1)
        if first is None or second is None or alpha != 1:
            return None
        if name == "add":
            return first[0] + second[0], first[1] + second[1]
        if name == "sub":
            return first[0] - second[1], first[1] - second[0]
        if _nonneg(first[0]) and _nonneg(second[0]):
            return first[0] * second[0], first[1] * second[1]
    return None


def _lookups(node: torch.fx.Node) -> tuple[Any, Any] | None:
    """(table, indices) of a row lookup on dim 0."""
    name = op_name(node)
    if name == "embedding" and len(node.args) >= 2:
        return node.args[0], node.args[1]
    if name == "index_select" and len(node.args) >= 3 and node.args[1] == 0:
        return node.args[0], node.args[2]
    if name == "index" and len(node.args) >= 2 and isinstance(node.args[1], (list, tuple)) \
            and len(node.args[1]) == 1:
        return node.args[0], node.args[1][0]
    return None


def position_bounds(program: Program) -> dict[str, int]:
    """Per dynamic dim label, the largest size every position lookup in the graph allows."""
    labels: dict[sympy.Symbol, str] = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for spec, ph in zip(program.inputs, placeholders):
        val = ph.meta.get("val")
        for dim, label in spec.dynamic.items():
            size = val.shape[dim] if isinstance(val, torch.Tensor) and dim < val.dim() else None
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                labels[size.node.expr] = label
    ranges: dict[torch.fx.Node, Range] = {}
    bounds: dict[str, int] = {}
    for node in program.graph.nodes:
        r = _range(node, ranges)
        if r is not None:
            ranges[node] = r
        lookup = _lookups(node) if node.op == "call_function" else None
        if lookup is None or not isinstance(lookup[1], torch.fx.Node) or lookup[1] not in ranges:
            continue
        table = lookup[0].meta.get("val") if isinstance(lookup[0], torch.fx.Node) else None
        rows = table.shape[0] if isinstance(table, torch.Tensor) and table.dim() else None
        hi = sympy.expand(ranges[lookup[1]][1])
        free = hi.free_symbols
        if not isinstance(rows, int) or len(free) != 1 or next(iter(free)) not in labels:
            continue
        s = next(iter(free))
        poly = sympy.Poly(hi, s) if hi.is_polynomial(s) else None
        if poly is None or poly.degree() != 1:
            continue
        a, b = poly.all_coeffs()
        if not (a.is_number and b.is_number and a > 0):
            continue
        top = int(sympy.floor((rows - 1 - b) / a))
        label = labels[s]
        bounds[label] = min(bounds.get(label, top), top)
    return bounds
