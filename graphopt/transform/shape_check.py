"""verify-each's shape check: does a Program's recorded ``meta["val"]`` match a fresh propagation?

The fresh propagation runs static fake tensors at the placeholders' example sizes (each symbolic
size's hint), in a fake mode of its own; a recorded symbolic size is compared by its hint (``s0*64``
with ``s0 = 2`` against 128). Propagating fresh symbols in a ShapeEnv of its own instead cost 0.5-1.2 s
a graph on a tiny zoo or Hugging Face model, almost all of it symbolic arithmetic, and compared
nothing more (symbols may be renamed, so only concrete sizes were compared): t5-rec:tiny's O2 took
7.0 s of fresh propagations, 1.1 s at example sizes (2026-12-07, AMD EPYC). What it gives up: a
graph that propagates at its example sizes but not symbolically is not caught here; the ``shapes``
analysis a later pass requires, and a lowering with dynamic shapes, still propagate symbolically.

verify-each ran up to two propagations per pass: under the test suite's verify-each,
the tuner's sensitivity tables of gpt-rec:tiny took 44 s instead of 9 (2026-12-07, AMD
EPYC), 39 of them propagating graphs seen before (each of the 27 ``optimize`` calls
starts from the same Program). The result of a fresh propagation depends only on the
graph's code, its placeholders' dtypes, devices and sizes (their example values) and its
constants' dtypes, devices, sizes and strides (and the value of a
one-element constant, which a fake tensor keeps), so it is kept per
process under a digest of exactly those (:func:`propagation_key`, the last
:data:`CACHE_SIZE`), as a summary of each node's tensors (dtype, rank, concrete sizes)
or the propagation's error. The recorded metadata is compared with it every time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from graphopt.ir.fx import fetch_attr

if TYPE_CHECKING:
    from graphopt.ir.program import Program

__all__ = ["CACHE_SIZE", "graph_digest", "propagation_key", "stale_shapes"]

#: fresh propagations kept per process (summaries: a few KB each)
CACHE_SIZE = 256

#: a tensor as the check compares it: dtype, each size as shown (a symbolic one as its expression), and each
#: size as compared (a symbolic one by its example value; None where it has none: unbacked)
_Summary = tuple[torch.dtype, tuple[int | str, ...], tuple[int | None, ...]]
_CACHE: OrderedDict[str, dict[str, list[_Summary | None]] | Exception] = OrderedDict()


def graph_digest(program: Program) -> str:
    """A digest of the graph's code (the nodes, their targets and arguments)."""
    return hashlib.sha1(program.gm.graph.python_code("self").src.encode()).hexdigest()


def _size(d: Any) -> str:
    return f"s{d.node.hint}" if isinstance(d, torch.SymInt) else str(int(d))


def propagation_key(program: Program) -> str:
    """A digest of everything a fresh propagation reads: the graph's code, each placeholder's
    dtype, device and sizes (symbolic ones by their example value) and each constant's dtype,
    device, sizes and strides."""
    h = hashlib.sha1(graph_digest(program).encode())
    for n in program.gm.graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
            h.update(f"|{n.name}:{type(v).__name__}".encode())
            if isinstance(v, torch.Tensor):
                h.update(f"{v.dtype}{v.device}{[_size(d) for d in v.shape]}".encode())
        elif n.op == "get_attr":
            try:
                v = fetch_attr(program.gm, n.target)
            except AttributeError:
                v = None
            h.update(f"|{n.target}:{type(v).__name__}".encode())
            if isinstance(v, torch.Tensor):
                h.update(f"{v.dtype}{v.device}{list(v.shape)}{list(v.stride())}".encode())
                if v.numel() <= 1:  # fake tensors keep a scalar constant's value (.item() reads it)
                    h.update(repr(v.tolist()).encode())
    return h.hexdigest()


def _summary(val: Any) -> list[_Summary | None] | None:
    vals = list(val) if isinstance(val, (tuple, list)) else [val]
    if not any(isinstance(v, torch.Tensor) for v in vals):
        return None
    return [(v.dtype, tuple(d if isinstance(d, int) else str(d) for d in v.shape),
             tuple(d if isinstance(d, int) else _example(d) for d in v.shape)) if isinstance(v, torch.Tensor)
            else None for v in vals]


def _example(d: torch.SymInt) -> int | None:
    hint = d.node.hint
    return int(hint) if hint is not None else None


def _text(vals: list[_Summary | None]) -> str:
    return " ".join(f"[{', '.join(str(d) for d in v[1])}] {str(v[0]).removeprefix('torch.')}"
                    if v is not None else "-" for v in vals)


def _differ(a: list[_Summary | None], b: list[_Summary | None]) -> bool:
    """Rank, dtype or a size differs (a symbolic size by its example value; one without is not compared)."""
    if len(a) != len(b):
        return True
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        if x[0] != y[0] or len(x[1]) != len(y[1]):
            return True
        if any(p is not None and q is not None and p != q for p, q in zip(x[2], y[2])):
            return True
    return False


def _fresh(program: Program) -> dict[str, list[_Summary | None]]:
    """Each node's tensors after a propagation at example sizes; the Program's metadata is put back."""
    from graphopt.transform.analysis import propagate_shapes

    nodes = list(program.gm.graph.nodes)
    saved = [dict(n.meta) for n in nodes]
    try:
        propagate_shapes(program, at_examples=True)
        fresh = {n.name: s for n in nodes if (s := _summary(n.meta.get("val"))) is not None}
    finally:
        for n, meta in zip(nodes, saved):
            n.meta.clear()
            n.meta.update(meta)
    return fresh


def stale_shapes(program: Program, *, reuse: bool = True) -> list[str]:
    """``"node records S, is T"`` for each node whose recorded ``meta["val"]`` differs in rank,
    dtype or a size from a fresh propagation at the example sizes (a recorded symbolic size compared by
    its example value); raises what the propagation raised. The Program's metadata and symbols are left
    as they were; the propagation is reused for a Program with the same :func:`propagation_key`
    (``reuse=False``: propagated here, and not kept)."""
    key = propagation_key(program)
    fresh = _CACHE.get(key) if reuse else None
    if fresh is None:
        try:
            fresh = _fresh(program)
        except Exception as e:
            fresh = e.with_traceback(None)  # kept without the frames (and fake tensors) it ran in
        if reuse:
            _CACHE[key] = fresh
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    if isinstance(fresh, Exception):
        raise fresh
    out = []
    for n in program.gm.graph.nodes:
        recorded = _summary(n.meta.get("val"))
        if n.op != "placeholder" and recorded is not None and n.name in fresh and _differ(recorded, fresh[n.name]):
            out.append(f"{n.name} records {_text(recorded)}, is {_text(fresh[n.name])}")
    return out
