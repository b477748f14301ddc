"""The input contract of a lowered Program, read from its captured graph, and its check.

- dims: the [min, max] torch.export proved for each dynamic dim label (e.g.
  seq <= the position table); inputs sharing a label must agree (the mask's
  seq is the ids' seq), as export proved when it unified them;
- index ranges: an integer input whose values reach an embedding table of N
  rows (through view-like ops) must hold values in [0, N); where each slot
  ``input[:, t]`` feeds its own table (DLRM's sparse features), each slot is
  held to its own table's rows;
- no NaN or infinity in a floating-point input (a NaN feature turns the row's
  scores into NaN, which ranks arbitrarily downstream; an infinity gave NaN
  scores on some runtimes and finite ones on others).

Stored in the manifest (``dims``, ``index_ranges``) and checked by the
Runner base class before any backend runs, with the same words on every
runtime, so an out-of-range id is an error, never an aborted process
(Inductor) or silently wrapped scores (ONNX Gather).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from graphopt.errors import RunnerError
from graphopt.ir.fx import op_name
from graphopt.ir.program import Program

__all__ = ["dim_ranges", "index_ranges", "check_contract", "size_outside"]

#: ops through which an input's values reach a table unchanged (only positions move)
_VALUE_PRESERVING = {
    "view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "expand", "slice", "select",
    "clone", "contiguous", "permute", "transpose", "t", "alias", "detach", "lift_fresh_copy",
}


def _finite_int(value: Any) -> int | None:
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return v if abs(v) < 2**62 else None


def dim_ranges(program: Program) -> dict[str, dict[str, int | None]]:
    """Per dynamic label, the [min, max] torch.export proved (max None = unbounded)."""
    out: dict[str, dict[str, int | None]] = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for spec, ph in zip(program.inputs, placeholders):
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for dim, label in spec.dynamic.items():
            size = val.shape[dim] if dim < val.dim() else None
            if not isinstance(size, torch.SymInt):
                continue
            try:
                vr = size.node.shape_env.var_to_range.get(size.node.expr)
            except AttributeError:
                vr = None
            if vr is None:
                continue
            # torch.export reports min 2 for dims it refused to specialize at 0/1;
            # the lowered graphs are shape-generic and are tested at 1 too
            lo = _finite_int(vr.lower) or 1
            lo = 1 if lo <= 2 else lo
            hi = _finite_int(vr.upper)
            cur = out.setdefault(label, {"min": lo, "max": hi})
            cur["min"] = max(cur["min"] or 0, lo)
            if hi is not None:
                cur["max"] = hi if cur["max"] is None else min(cur["max"], hi)
    return out


def size_outside(ranges: dict[str, dict[str, int | None]], name: str,
                 asked: Any) -> str | None:
    """The first asked size outside the range torch.export proved for its dim, as one line
    (``--seq-lens 600: bert4rec:tiny takes seq in [1, 512]; pick sizes within it``), else None.
    ``asked``: (flag, label, sizes) triples; labels without a range pass."""
    for flag, label, sizes in asked:
        bound = ranges.get(label) or {}
        lo, hi = bound.get("min"), bound.get("max")
        for size in sizes or []:
            if (lo is not None and int(size) < lo) or (hi is not None and int(size) > hi):
                return (f"{flag} {int(size)}: {name} takes {label} in [{lo}, "
                        f"{'unbounded' if hi is None else hi}]; pick sizes within it")
    return None


def _table_rows(node: torch.fx.Node, arg: torch.fx.Node) -> int | None:
    """Rows of the table ``node`` indexes with ``arg`` (embedding, embedding_bag, index_select on dim 0)."""
    op = op_name(node)
    if op in ("embedding", "embedding_bag") and len(node.args) > 1 and node.args[1] is arg:
        table = node.args[0]
    elif op == "index_select" and len(node.args) > 2 and node.args[2] is arg and node.args[1] == 0:
        table = node.args[0]
    else:
        return None
    val = table.meta.get("val") if isinstance(table, torch.fx.Node) else None
    size = val.shape[0] if isinstance(val, torch.Tensor) else None
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
        if spec.dtype.is_floating_point or spec.dtype == torch.bool:
            continue
        rows: list[tuple[int, tuple[int, int] | None]] = []  # (table rows, (dim, index) of a slot select)
        # (node, slot select seen on the way, dims still numbered as the input's)
        frontier: list[tuple[torch.fx.Node, tuple[int, int] | None, bool]] = [(ph, None, True)]
        seen = {ph}
        while frontier:
            cur, slot, same_dims = frontier.pop()
            for user in cur.users:
                n = _table_rows(user, cur)
                if n is not None:
                    rows.append((n, slot))
                elif user.op == "call_function" and op_name(user) in _VALUE_PRESERVING and user.args and \
                        user.args[0] is cur and user not in seen:
                    seen.add(user)
                    if same_dims and slot is None and _slot(user, len(spec.shape)) is not None:
                        frontier.append((user, _slot(user, len(spec.shape)), False))
                    else:
                        frontier.append((user, slot, same_dims and slot is None and _keeps_dims(user)))
        if rows:
            out[spec.name] = _slot_ranges(rows, spec.shape) or [0, min(n for n, _ in rows)]
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
    """Copies and full slices: the output's dims are the input's, element for element."""
    name = op_name(node)
    if name in ("clone", "contiguous", "alias", "detach", "lift_fresh_copy"):
        return True
    if name == "slice":
        start = node.args[2] if len(node.args) > 2 else 0
        end = node.args[3] if len(node.args) > 3 else None
        return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62))
    return False


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


def check_contract(specs: Any, args: Any, dims: dict[str, Any], ranges: dict[str, Any], runtime: str) -> None:
    """Raise ``RunnerError`` (one line, ``runtime | input 'x': ...``) when inputs break the contract."""
    sizes: dict[str, tuple[str, int]] = {}
    for spec, value in zip(specs, args):
        for dim, label in spec.dynamic.items():
            size = int(value.shape[dim])
            if label in sizes and sizes[label][1] != size:
                other, was = sizes[label]
                raise RunnerError(f"{runtime} | input '{spec.name}': dim {dim} ({label}) is {size} but "
                                  f"'{other}' has {label} {was}; they must be equal")
            sizes.setdefault(label, (spec.name, size))
            bound = dims.get(label) or {}
            lo, hi = max(1, bound.get("min") or 1), bound.get("max")
            if size < lo or (hi is not None and size > hi):
                within = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise RunnerError(f"{runtime} | input '{spec.name}': dim {dim} ({label}) must be {within}, got {size}")
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            first = (~torch.isfinite(value)).nonzero()[0]
            at = [int(i) for i in first.tolist()]
            what = "NaN" if bool(torch.isnan(value[tuple(first)])) else "inf"  # runtimes differ on both
            raise RunnerError(f"{runtime} | input '{spec.name}': {what} at {at}; inputs must not hold NaN or "
                              "inf (replace missing values before calling)")
        bounds = ranges.get(spec.name)
        if bounds and value.numel():
            if isinstance(bounds, dict):  # one range per slot along bounds["dim"]
                dim = int(bounds["dim"])
                for i, high in enumerate(bounds["high"]):
                    where = "[" + ", ".join([":"] * dim + [str(i)]) + ", ...]"
                    _check_values(value.select(dim, i), 0, int(high), f"{runtime} | input '{spec.name}'{where}",
                                  lambda at, d=dim, i=i: at[:d] + [i] + at[d:])
            else:
                _check_values(value, int(bounds[0]), int(bounds[1]), f"{runtime} | input '{spec.name}'", lambda at: at)


def _check_values(value: torch.Tensor, low: int, high: int, where: str, locate: Any) -> None:
    if not value.numel():
        return
    vmin, vmax = (int(v) for v in torch.aminmax(value))
    if vmin < low or vmax >= high:
        bad = vmin if vmin < low else vmax
        at = locate([int(i) for i in (value == bad).nonzero()[0].tolist()])
        raise RunnerError(f"{where}: values must be in [{low}, {high}), got {int(bad)} at {at}")
