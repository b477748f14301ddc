"""The input contract of a lowered Program, read from its captured graph.

Today: the [min, max] that torch.export proved for each dynamic dim label.
"""

from __future__ import annotations

from typing import Any

import torch

from graphopt.ir.program import Program

__all__ = ["dim_ranges"]


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
