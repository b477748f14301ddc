"""The input contract of a lowered Program, read from its captured graph, and its check.

- dims: the [min, max] torch.export proved for each dynamic dim label (e.g.
  seq <= the position table), the max also held to the rows of a position
  table that ``arange(seq)`` indexes where export proved nothing
  (:mod:`graphopt.runtime.position_bounds`); inputs sharing a label must agree (the mask's
  seq is the ids' seq), as export proved when it unified them;
- index ranges (found by :mod:`graphopt.runtime.index_ranges`): an input whose
  values reach an embedding table of N rows (through view-like ops, casts and
  constant shifts; ``embedding``, ``embedding_bag``, ``index_select`` or
  ``index(t, [ids])`` on dim 0, as prune-embeddings' id remap) must hold values
  in [0, N) (moved by the shift); where each slot ``input[:, t]`` feeds its own
  table (DLRM's sparse features), each slot is held to its own table's rows;
- EmbeddingBag offsets: an input that is the ``offsets`` of an EmbeddingBag
  over a 1-D ids input (recorded in ``index_ranges`` as ``{"offsets_of":
  ids, "include_last_offset": bool}``, and kept in ``Program.meta["bag_offsets"]``
  once embedding-bag-to-gather has rewritten the op) must start at 0, never
  decrease and end at most at len(ids) (exactly at it with include_last_offset);
  such ids (and their per-sample weights) may be empty when nothing else reads them;
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
from graphopt.ir.value_ops import CASTS, SAME_VALUES
from graphopt.runtime.position_bounds import position_bounds

__all__ = ["dim_ranges", "bag_offsets", "check_contract", "size_outside"]

#: ops through which an input's values reach a table unchanged (only positions move; a slice or
#: select keeps some of them). Casts pass values when both sides are integer tensors (an id outside
#: the table is refused at the input, before any narrowing could wrap it into range)
_VALUE_PRESERVING = SAME_VALUES | {"slice", "select"}
_BAGS = {"embedding_bag", "_embedding_bag", "_embedding_bag_forward_only"}


def _is_int(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and not val.dtype.is_floating_point and not val.dtype.is_complex \
        and val.dtype != torch.bool


def _passes_values(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    """``node`` reads ``src`` (its first argument) and holds the same values, positions aside."""
    if node.op != "call_function" or not node.args or node.args[0] is not src:
        return False
    name = op_name(node)
    return name in _VALUE_PRESERVING or (name in CASTS and _is_int(src) and _is_int(node))


def _finite_int(value: Any) -> int | None:
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return v if abs(v) < 2**62 else None


def dim_ranges(program: Program) -> dict[str, dict[str, int | None]]:
    """Per dynamic label, the [min, max] torch.export proved (max None = unbounded), the max
    also held to what position tables allow (:mod:`graphopt.runtime.position_bounds`)."""
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
    for label, top in position_bounds(program).items():  # seq <= a position table export did not bound
        if label in out:
            out[label]["max"] = top if out[label]["max"] is None else min(out[label]["max"], top)
    for label in _empty_ok_labels(program):
        out.setdefault(label, {"min": 0, "max": None})["min"] = 0
    return out


def _empty_ok_labels(program: Program) -> set[str]:
    """Labels carried only by dim 0 of EmbeddingBag ids / per-sample weights that nothing
    but the bag reads: zero ids make every bag empty (zeros), exactly, on every runtime."""
    recs = [r for r in bag_offsets(program).values() if r.get("empty_ok")]
    bag_inputs = {r["ids"] for r in recs} | {r["weights"] for r in recs if r.get("weights")}
    ok: set[str] = set()
    not_ok: set[str] = set()
    for spec in program.inputs:
        for dim, label in spec.dynamic.items():
            (ok if spec.name in bag_inputs and dim == 0 and len(spec.shape) == 1 else not_ok).add(label)
    return ok - not_ok


def bag_offsets(program: Program) -> dict[str, dict[str, Any]]:
    """Per input that is the ``offsets`` of an EmbeddingBag over a 1-D ids input:
    ``{"ids", "weights", "include_last_offset", "empty_ok"}`` (input names; ``empty_ok``:
    the bag is the only reader of its ids and weights). Read from the graph's
    ``embedding_bag`` ops and from ``program.meta["bag_offsets"]``, which
    embedding-bag-to-gather fills before it rewrites them."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    names = {ph: spec.name for spec, ph in zip(program.inputs, placeholders)}
    out = {k: dict(v) for k, v in (program.meta.get("bag_offsets") or {}).items()}
    for node in program.graph.nodes:
        if node.op != "call_function" or op_name(node) not in _BAGS:
            continue
        args = dict(zip(("weight", "indices", "offsets", "scale", "mode", "sparse", "psw", "last"), node.args))
        psw = args.get("psw", node.kwargs.get("per_sample_weights"))
        last = args.get("last", node.kwargs.get("include_last_offset", False))
        off, ids = _source(args.get("offsets"), names), _source(args.get("indices"), names)
        weights = _source(psw, names)
        by_length = ids is None
        if by_length:  # ids gathered first (quantize-embeddings): the 1-D integer input of the same length
            ids = _same_length(args.get("indices"), names)
        if off is None or ids is None or not all(_is_int(n) and n.meta["val"].dim() == 1 for n in (off, ids)):
            continue
        empty_ok = not by_length and _only_reader(ids, node) and (psw is None or (
            weights is not None and _only_reader(weights, node)))
        out[names[off]] = {"ids": names[ids], "weights": names.get(weights) if weights is not None else None,
                           "include_last_offset": bool(last), "empty_ok": bool(empty_ok)}
    known = set(names.values())
    return {k: v for k, v in out.items() if k in known and v.get("ids") in known}


def _source(node: Any, names: dict[torch.fx.Node, str]) -> torch.fx.Node | None:
    """The input ``node`` holds the values of (through casts and view-like ops), else None."""
    while isinstance(node, torch.fx.Node) and node not in names:
        src = node.args[0] if node.op == "call_function" and node.args else None
        if not (isinstance(src, torch.fx.Node) and _passes_values(node, src)):
            return None
        node = src
    return node if isinstance(node, torch.fx.Node) else None


def _same_length(node: Any, names: dict[torch.fx.Node, str]) -> torch.fx.Node | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 1 or not isinstance(val.shape[0], torch.SymInt):
        return None
    same = [ph for ph in names if _is_int(ph) and ph.meta["val"].dim() == 1
            and str(ph.meta["val"].shape[0]) == str(val.shape[0])]
    return same[0] if len(same) == 1 else None


def _only_reader(ph: torch.fx.Node, bag: torch.fx.Node) -> bool:
    """Every read of ``ph`` (through casts and views) is ``bag``."""
    frontier, seen = [ph], {ph}
    while frontier:
        cur = frontier.pop()
        for user in cur.users:
            if user is bag or (user.op == "call_module" and str(user.target) == "_guards_fn"):
                continue  # torch.export's input guards read every input
            if not _passes_values(user, cur) or user in seen:
                return False
            seen.add(user)
            frontier.append(user)
    return True


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


def check_contract(specs: Any, args: Any, dims: dict[str, Any], ranges: dict[str, Any], runtime: str) -> None:
    """Raise ``RunnerError`` (one line, ``runtime | input 'x': ...``) when inputs break the contract."""
    sizes: dict[str, tuple[str, int]] = {}
    by_name = {spec.name: value for spec, value in zip(specs, args)}
    for spec, value in zip(specs, args):
        for dim, label in spec.dynamic.items():
            size = int(value.shape[dim])
            if label in sizes and sizes[label][1] != size:
                other, was = sizes[label]
                raise RunnerError(f"{runtime} | input '{spec.name}': dim {dim} ({label}) is {size} but "
                                  f"'{other}' has {label} {was}; they must be equal")
            sizes.setdefault(label, (spec.name, size))
            bound = dims.get(label) or {}
            lo, hi = bound.get("min"), bound.get("max")
            lo = 1 if lo is None else max(0, int(lo))
            if size < lo or (hi is not None and size > hi):
                within = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                empty = "; an empty batch has nothing to score: skip the call" if size == 0 and label == "batch" else ""
                raise RunnerError(f"{runtime} | input '{spec.name}': dim {dim} ({label}) must be {within}, "
                                  f"got {size}{empty}")
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            first = (~torch.isfinite(value)).nonzero()[0]
            at = [int(i) for i in first.tolist()]
            what = "NaN" if bool(torch.isnan(value[tuple(first)])) else "inf"  # runtimes differ on both
            raise RunnerError(f"{runtime} | input '{spec.name}': {what} at {at}; inputs must not hold NaN or "
                              "inf (replace missing values before calling)")
        bounds = ranges.get(spec.name)
        if isinstance(bounds, dict) and "offsets_of" in bounds:
            ids = by_name.get(bounds["offsets_of"])
            if ids is not None:
                _check_offsets(value, ids, bounds, f"{runtime} | input '{spec.name}'")
        elif bounds and value.numel():
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
    vmin, vmax = (v.item() for v in torch.aminmax(value))  # as they are: int() would truncate a float id
    if vmin < low or vmax >= high:
        bad = vmin if vmin < low else vmax
        at = locate([int(i) for i in (value == bad).nonzero()[0].tolist()])
        raise RunnerError(f"{where}: values must be in [{low}, {high}), got {bad} at {at}")


def _check_offsets(value: torch.Tensor, ids: torch.Tensor, bounds: dict[str, Any], where: str) -> None:
    """EmbeddingBag offsets: start at 0, never decrease, end within the ids (at their end
    with include_last_offset); what eager EmbeddingBag refuses, the gather form would wrap."""
    if not value.numel():
        return
    n, last = int(ids.numel()), bool(bounds.get("include_last_offset"))
    off = value.reshape(-1).to(torch.int64)
    rule = (f"EmbeddingBag offsets must start at 0, never decrease and end "
            f"{'at' if last else 'at most at'} len('{bounds['offsets_of']}') = {n}")
    fix = f"pass the start of each bag in '{bounds['offsets_of']}'" + (" and its length last" if last else "")
    if int(off[0]) != 0:
        raise RunnerError(f"{where}: {rule}; got {int(off[0])} at [0]; {fix}")
    drops = (off[1:] < off[:-1]).nonzero()
    if drops.numel():
        i = int(drops[0]) + 1
        raise RunnerError(f"{where}: {rule}; got {int(off[i])} at [{i}] after {int(off[i - 1])}; {fix}")
    end = int(off[-1])
    if end > n or (last and end != n):
        raise RunnerError(f"{where}: {rule}; got {end} at [{off.numel() - 1}]; {fix}")
