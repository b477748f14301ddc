"""Which integer inputs index embedding tables, and the values each may hold (the contract's
``index_ranges``; :mod:`graphopt.runtime.contract` checks them before any backend runs).

An input reaches a table of N rows through view-like ops and casts (``embedding``,
``embedding_bag``, ``index_select`` on dim 0, ``index(t, [ids])`` as prune-embeddings'
id remap) and holds values in ``[0, N)``. Also followed:

- a constant shift, ``ids + c`` / ``ids - c`` (a padding row kept at 0: ``emb(ids + 1)``):
  the input's range moves by ``-c`` (was: unchecked, and ONNX Runtime's Gather wrapped
  ``-1`` to the last row while eager raised);
- a float input cast to an integer (CTR features carried in one float tensor,
  ``x[:, 3].long()``): its raw values are held to the range (a negative or too large id
  is refused, not truncated into range), per feature slot where the slots are selected;
  a float input only part of whose slots reach tables (dense features beside ids) gets no
  range, since its other columns may hold anything.

Where each slot ``input[:, t]`` feeds its own table (DLRM's sparse features), each slot
is held to its own table's rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from graphopt.ir.fx import fetch_attr, op_name
from graphopt.ir.program import Program
from graphopt.ir.value_ops import CASTS, COPIES, is_full_slice
from graphopt.runtime.contract import _is_int, _passes_values, bag_offsets

__all__ = ["index_ranges"]


def _shift(node: torch.fx.Node, src: torch.fx.Node) -> int | None:
    """``c`` when ``node`` is ``src + c`` (or ``src - c``) for a constant int ``c``, else None."""
    if node.op != "call_function" or len(node.args) != 2 or node.args[0] is not src or not _is_int(node):
        return None
    c, name = node.args[1], op_name(node)
    if isinstance(c, bool) or not isinstance(c, int) or node.kwargs.get("alpha", 1) != 1:
        return None
    return c if name == "add" else -c if name == "sub" else None


def _follows(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    """``node`` holds ``src``'s values: view-like ops, integer casts, and a float-to-integer cast."""
    if _passes_values(node, src):
        return True
    val = src.meta.get("val")
    return (op_name(node) in CASTS and node.args[:1] == (src,) and _is_int(node)
            and isinstance(val, torch.Tensor) and val.dtype.is_floating_point)


def _table_rows(node: torch.fx.Node, arg: torch.fx.Node) -> int | None:
    """Rows of the table ``node`` indexes with ``arg`` (embedding, embedding_bag, index_select
    on dim 0, ``index(t, [arg])``: one index tensor on dim 0, as prune-embeddings' id remap)."""
    op = op_name(node)
    if op in ("embedding", "embedding_bag") and len(node.args) > 1 and node.args[1] is arg:
        table = node.args[0]
    elif op == "index_select" and len(node.args) > 2 and node.args[2] is arg and node.args[1] == 0:
        table = node.args[0]
    elif op == "index" and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) \
            and len(node.args[1]) == 1 and node.args[1][0] is arg:
        table = node.args[0]
    else:
        return None
    val = table.meta.get("val") if isinstance(table, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) and isinstance(table, torch.fx.Node) and table.op == "get_attr":
        try:
            val = fetch_attr(table.graph.owning_module, str(table.target))
        except AttributeError:
            val = None
    size = val.shape[0] if isinstance(val, torch.Tensor) and val.dim() else None
    return size if isinstance(size, int) else None


def index_ranges(program: Program) -> dict[str, Any]:
    """Per integer input that indexes embedding tables: ``[0, rows)`` of the smallest one.

    When every table an input reaches is reached through ``input.select(dim, i)``
    (one table per feature slot, as DLRM's ``sparse[:, t]``), each slot gets
    its own table's range: ``{"dim": dim, "high": [rows of slot 0, ...]}``, so
    realistic ids of a large table are not held to the smallest table's range.
    """
    out: dict[str, Any] = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for spec, ph in zip(program.inputs, placeholders):
        if spec.dtype == torch.bool or spec.dtype.is_complex:
            continue
        rows: list[tuple[int, tuple[int, int] | None]] = []  # (table rows, (dim, index) of a slot select)
        shifts: list[int] = []  # the constant added to the input's values on the way to each table
        # (node, slot select seen on the way, dims still numbered as the input's, shift so far)
        frontier: list[tuple[torch.fx.Node, tuple[int, int] | None, bool, int]] = [(ph, None, True, 0)]
        seen = {ph}
        while frontier:
            cur, slot, same_dims, shift = frontier.pop()
            for user in cur.users:
                n = _table_rows(user, cur)
                if n is not None:
                    rows.append((n, slot))
                    shifts.append(shift)
                elif user in seen:
                    continue
                elif _follows(user, cur):
                    seen.add(user)
                    if same_dims and slot is None and _slot(user, len(spec.shape)) is not None:
                        frontier.append((user, _slot(user, len(spec.shape)), False, shift))
                    else:
                        frontier.append((user, slot, same_dims and slot is None and _keeps_dims(user), shift))
                elif _shift(user, cur) is not None:
                    seen.add(user)
                    frontier.append((user, slot, same_dims and slot is None, shift + _shift(user, cur)))
        if not rows:
            continue
        slots = _slot_ranges(rows, spec.shape) if not any(shifts) else None
        if slots is not None:
            out[spec.name] = slots
        elif not spec.dtype.is_floating_point or all(slot is None for _, slot in rows):
            out[spec.name] = [max(-c for c in shifts), min(n - c for (n, _), c in zip(rows, shifts))]
    for name, rec in bag_offsets(program).items():
        out.setdefault(name, {"offsets_of": rec["ids"], "include_last_offset": bool(rec["include_last_offset"])})
    return out


def _slot(node: torch.fx.Node, rank: int) -> tuple[int, int] | None:
    """(dim, index) when ``node`` is ``select(input, dim, index)`` with constant ints."""
    if op_name(node) != "select" or len(node.args) < 3:
        return None
    dim, index = node.args[1], node.args[2]
    if not (isinstance(dim, int) and isinstance(index, int)):
        return None
    return (dim % rank, index)


def _keeps_dims(node: torch.fx.Node) -> bool:
    """Copies, casts and full slices: the output's dims are the input's, element for element."""
    return op_name(node) in COPIES or op_name(node) in CASTS or is_full_slice(node)


def _slot_ranges(rows: list[tuple[int, tuple[int, int] | None]], shape: Any) -> dict[str, Any] | None:
    """``{"dim", "high"}`` when every table is reached through a select on one
    static dim and every index of that dim reaches one; else None."""
    slots = {slot for _, slot in rows}
    if None in slots or len({d for d, _ in slots}) != 1:  # type: ignore[misc]
        return None
    dim = next(iter(slots))[0]  # type: ignore[index]
    size = shape[dim] if dim < len(shape) else None
    if not isinstance(size, int):
        return None
    high: list[int | None] = [None] * size
    for n, (_, i) in rows:  # type: ignore[misc]
        i %= size
        high[i] = n if high[i] is None else min(high[i], n)  # type: ignore[type-var]
    if any(h is None for h in high):
        return None
    return {"dim": dim, "high": high}
