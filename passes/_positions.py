"""How a selection of positions moves through the ops that act per position
(the rule table of prune-positions; not a pass itself).

A selection keeps the entries ``start:end:step`` of one axis of a tensor; the
axis stays (``aten.slice``), only shorter. ``move(step, x, axis)`` builds a new
node computing ``x`` on the selected entries of its output axis ``axis`` from
the selected entries of its inputs: ``step.sel(input, input_axis)`` for an input
that carries the axis, the input unchanged where it broadcasts along it (size 1
or absent). An op that is not provably per position along ``axis`` raises
:class:`NotPerPosition` with the reason.

Two layouts are understood besides plain ops: head views (``view``/``reshape``
that split or merge other dims around the axis, ``transpose``/``permute``), and
flattened rows (``reshape(f(reshape(x, [-1, k])), [b, s, n])``, what
fuse-linear-act leaves): the whole row chain is rebuilt on the selected rows.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphopt.ir.fx import is_op, tensor_meta

__all__ = ["INT_MAX", "Rows", "Step", "NotPerPosition", "move", "kind_of"]

aten = torch.ops.aten
Node = torch.fx.Node

INT_MAX = 9223372036854775807


class NotPerPosition(Exception):
    """``x`` cannot be computed on the selected positions alone (the message says why)."""


@dataclass(frozen=True)
class Rows:
    """Positions ``start:end:step`` of one axis; ``single`` when it is one position."""

    start: int
    end: int
    step: int = 1

    @classmethod
    def index(cls, i: int) -> Rows:
        return cls(i, INT_MAX if i == -1 else i + 1)

    @property
    def single(self) -> bool:
        return self.step == 1 and (self.end == self.start + 1 or (self.start == -1 and self.end == INT_MAX))

    @property
    def full(self) -> bool:
        return self.start in (0, None) and self.end >= INT_MAX and self.step == 1

    def __str__(self) -> str:
        end = "" if self.end >= INT_MAX else str(self.end)
        return f"[{self.start}:{end}" + (f":{self.step}]" if self.step != 1 else "]")


class Step(Protocol):
    """What a rule may do: select an input, size a view, emit the new node."""

    def sel(self, node: Node, axis: int) -> Node: ...
    def length(self, selected: Node, axis: int) -> int | Node: ...
    def emit(self, old: Node, target: Any, args: tuple, kwargs: dict | None = None) -> Node: ...
    @property
    def rows(self) -> Rows: ...


def _eq(a: Any, b: Any) -> bool:
    return bool(statically_known_true(a == b))


def _meta(node: Any, what: str) -> torch.Tensor:
    t = tensor_meta(node)
    if t is None:
        raise NotPerPosition(f"{what} has no shape metadata")
    return t


def _arg(node: Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _with(node: Node, index: int, value: Any) -> tuple:
    args = list(node.args)
    args[index] = value
    return tuple(args)


def broadcast(step: Step, operand: Any, out: torch.Tensor, axis: int) -> Any:
    """``operand`` of a broadcasting op restricted to the selected positions of ``out``."""
    t = tensor_meta(operand)
    if t is None:  # a number, a SymInt, None
        return operand
    a = axis - (out.dim() - t.dim())
    if a < 0 or _eq(t.shape[a], 1):
        return operand
    if _eq(t.shape[a], out.shape[axis]):
        return step.sel(operand, a)
    raise NotPerPosition(f"{operand.name} broadcasts along the position axis with an unproven size")


# ------------------------------------------------------------------ op rules
def _pointwise(step: Step, x: Node, axis: int) -> Node:
    if x.target is aten.dropout.default and _arg(x, 2, "train", False):
        raise NotPerPosition("dropout with train=True is random")
    out = _meta(x, x.name)
    args = torch.fx.node.map_arg(x.args, lambda n: broadcast(step, n, out, axis))
    kwargs = torch.fx.node.map_arg(x.kwargs, lambda n: broadcast(step, n, out, axis))
    return step.emit(x, x.target, args, kwargs)  # type: ignore[arg-type]


def _first_input(last_dims: Callable[[Node], int]):  # type: ignore[no-untyped-def]
    """Ops that act on the last ``last_dims(x)`` dims of arg 0 and per entry of the others."""

    def rule(step: Step, x: Node, axis: int) -> Node:
        rank = _meta(x, x.name).dim()
        if axis >= rank - last_dims(x):
            raise NotPerPosition(f"{x.target} mixes entries along the position axis")
        return step.emit(x, x.target, _with(x, 0, step.sel(x.args[0], axis)), dict(x.kwargs))  # type: ignore[arg-type]

    return rule


def _softmax(step: Step, x: Node, axis: int) -> Node:
    rank = _meta(x, x.name).dim()
    if int(x.args[1]) % rank == axis:  # type: ignore[call-overload]
        raise NotPerPosition("softmax normalises over the position axis")
    return step.emit(x, x.target, _with(x, 0, step.sel(x.args[0], axis)), dict(x.kwargs))  # type: ignore[arg-type]


def _matmul(step: Step, x: Node, axis: int) -> Node:
    a, b = x.args[0], x.args[1]
    out, ta, tb = _meta(x, x.name), _meta(a, "matmul lhs"), _meta(b, "matmul rhs")
    if ta.dim() < 2 or tb.dim() < 2:
        raise NotPerPosition("matmul with a 1-D operand")
    if axis == out.dim() - 1:
        raise NotPerPosition("the selection is on the matmul's output columns")
    if axis == out.dim() - 2:
        return step.emit(x, x.target, (step.sel(a, ta.dim() - 2), b) + tuple(x.args[2:]), dict(x.kwargs))  # type: ignore[arg-type]
    return step.emit(x, x.target, (broadcast(step, a, out, axis), broadcast(step, b, out, axis)), dict(x.kwargs))


def _addmm(step: Step, x: Node, axis: int) -> Node:
    """addmm / _addmm_activation (bias, rows, weight): rows are axis 0."""
    if axis != 0:
        raise NotPerPosition("the selection is on addmm's output columns")
    out = _meta(x, x.name)
    bias = broadcast(step, x.args[0], out, axis)
    return step.emit(x, x.target, (bias, step.sel(x.args[1], 0)) + tuple(x.args[2:]), dict(x.kwargs))  # type: ignore[arg-type]


def _sdpa(step: Step, x: Node, axis: int) -> Node:
    q, k, v = x.args[:3]
    mask = _arg(x, 3, "attn_mask", None)
    if _arg(x, 4, "dropout_p", 0.0):
        raise NotPerPosition("attention dropout is random")
    if x.kwargs.get("enable_gqa"):
        raise NotPerPosition("grouped-query attention maps heads unevenly")
    out = _meta(x, x.name)
    if axis == out.dim() - 1:
        raise NotPerPosition("the selection is on the attention output features")
    if axis == out.dim() - 2:  # query rows: k and v keep every position
        if _arg(x, 5, "is_causal", False):
            raise NotPerPosition("is_causal aligns its mask to the first query; fewer queries change it")
        q, mask = step.sel(q, _meta(q, "query").dim() - 2), broadcast(step, mask, out, axis)
    else:
        q, k, v, mask = (broadcast(step, t, out, axis) for t in (q, k, v, mask))
    args = list(x.args)
    args[:3] = [q, k, v]
    kwargs = dict(x.kwargs)
    if len(args) > 3:
        args[3] = mask
    elif "attn_mask" in kwargs:
        kwargs["attn_mask"] = mask
    return step.emit(x, x.target, tuple(args), kwargs)


def _embedding(step: Step, x: Node, axis: int) -> Node:
    if axis == _meta(x, x.name).dim() - 1:
        raise NotPerPosition("the selection is on the embedding features")
    return step.emit(x, x.target, _with(x, 1, step.sel(x.args[1], axis)), dict(x.kwargs))  # type: ignore[arg-type]


def _moved_axis(x: Node, axis: int) -> int:
    """The input axis that becomes output axis ``axis`` of a layout op."""
    rank = _meta(x, x.name).dim()
    t = x.target
    if t is aten.transpose.int:
        d0, d1 = (int(d) % rank for d in x.args[1:3])  # type: ignore[call-overload]
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if t is aten.t.default:
        return rank - 1 - axis
    if t is aten.permute.default:
        return int(x.args[1][axis]) % rank  # type: ignore[index]
    if t is aten.unsqueeze.default:
        d = int(x.args[1]) % rank  # type: ignore[call-overload]
        if d == axis:
            raise NotPerPosition("the selection is on the axis unsqueeze adds")
        return axis if axis < d else axis - 1
    in_rank = _meta(x.args[0], "input").dim()
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.select.int):
        dims = x.args[1] if isinstance(x.args[1], (list, tuple)) else [x.args[1]]
        removed = sorted(int(d) % in_rank for d in dims)  # type: ignore[call-overload]
        if t is not aten.select.int:
            removed = [d for d in removed if _eq(_meta(x.args[0], "input").shape[d], 1)]
        for d in removed:
            axis += d <= axis
        return axis
    if t is aten.slice.Tensor:
        if int(x.args[1]) % rank == axis:  # type: ignore[call-overload]
            raise NotPerPosition("a second slice on the position axis")
        return axis
    raise NotPerPosition(f"{t} is not a layout op")


def _layout(step: Step, x: Node, axis: int) -> Node:
    src = step.sel(x.args[0], _moved_axis(x, axis))
    return step.emit(x, x.target, _with(x, 0, src), dict(x.kwargs))


def _same_axis(shape_in: Any, shape_out: Any, axis: int) -> int | None:
    """The input axis a reshape maps onto output ``axis`` entry by entry, if any."""
    prefix = math.prod(shape_out[:axis])
    for i in range(len(shape_in)):
        if _eq(math.prod(shape_in[:i]), prefix) and _eq(shape_in[i], shape_out[axis]):
            return i
    return None


def _reshape(step: Step, x: Node, axis: int) -> Node:
    src, shape = x.args[0], list(x.args[1])  # type: ignore[arg-type]
    t_in, t_out = _meta(src, "reshape input"), _meta(x, x.name)
    a_in = _same_axis(t_in.shape, t_out.shape, axis)
    if a_in is None:
        if axis == 1 and t_in.dim() >= 2 and t_out.dim() == t_in.dim() + 1:
            return _unflatten(step, x)
        raise NotPerPosition("reshape mixes the position axis with other dims")
    selected = step.sel(src, a_in)
    if shape[axis] != -1:
        shape[axis] = step.length(selected, a_in)
    return step.emit(x, aten.reshape.default, (selected, shape))  # reshape: the slice may not be viewable


class _Rows(Step):
    """Selection on axis 0 of flattened rows [b*s, ...] of a [b, s, ...] tensor.

    ``sel`` follows the single-user row chain back to the flattening reshape
    and rebuilds it there on ``outer.sel(x, 1)``.
    """

    def __init__(self, outer: Step, unflatten: Node, b: Any, s: Any):
        self.outer, self.consumer, self.b, self.s = outer, unflatten, b, s
        self.selected: Node | None = None

    @property
    def rows(self) -> Rows:
        return self.outer.rows

    def length(self, selected: Node, axis: int) -> int | Node:
        return self.outer.length(selected, axis)

    def emit(self, old: Node, target: Any, args: tuple, kwargs: dict | None = None) -> Node:
        return self.outer.emit(old, target, args, kwargs)

    def sel(self, node: Node, axis: int) -> Node:
        if axis != 0 or node.op != "call_function":
            raise NotPerPosition(f"{getattr(node, 'name', node)} is not a flattened row tensor")
        if len(node.users) != 1:
            raise NotPerPosition(f"flattened rows {node.name} are read elsewhere too")
        flat = _meta(node, node.name)
        src = node.args[0] if node.target in _RESHAPES else None
        t_src = tensor_meta(src)
        if (t_src is not None and t_src.dim() == flat.dim() + 1 and _eq(t_src.shape[0], self.b)
                and _eq(t_src.shape[1], self.s) and all(_eq(p, q) for p, q in zip(t_src.shape[2:], flat.shape[1:]))):
            self.selected = self.outer.sel(src, 1)  # type: ignore[arg-type]
            shape = [-1] + list(node.args[1])[1:]  # type: ignore[arg-type]
            return self.outer.emit(node, aten.reshape.default, (self.selected, shape))
        return move(self, node, 0)


def _unflatten(step: Step, x: Node) -> Node:
    """``reshape(rows, [b, s, ...])`` where rows come from ``reshape(x, [-1, k])``."""
    rows, shape = x.args[0], list(x.args[1])  # type: ignore[arg-type]
    out, t_rows = _meta(x, x.name), _meta(rows, "rows")
    if not (_eq(out.shape[0] * out.shape[1], t_rows.shape[0])
            and all(_eq(p, q) for p, q in zip(out.shape[2:], t_rows.shape[1:]))):
        raise NotPerPosition("reshape is not an unflatten of [b*s, ...] rows into [b, s, ...]")
    inner = _Rows(step, x, out.shape[0], out.shape[1])
    new_rows = inner.sel(rows, 0)  # type: ignore[arg-type]
    assert inner.selected is not None
    shape[1] = step.length(inner.selected, 1)
    return step.emit(x, aten.reshape.default, (new_rows, shape))


def _expand(step: Step, x: Node, axis: int) -> Node:
    src, sizes = x.args[0], list(x.args[1])  # type: ignore[arg-type]
    t_in, out = _meta(src, "expand input"), _meta(x, x.name)
    a = axis - (out.dim() - t_in.dim())
    if a >= 0 and not _eq(t_in.shape[a], 1):
        sizes[axis] = -1
        return step.emit(x, x.target, (step.sel(src, a), sizes))  # type: ignore[arg-type]
    if not step.rows.single:
        raise NotPerPosition("expand from size 1 to a selection of unknown length")
    sizes[axis] = 1
    return step.emit(x, x.target, (src, sizes))


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_LAYOUT = (aten.transpose.int, aten.t.default, aten.permute.default, aten.unsqueeze.default,
           aten.squeeze.dim, aten.squeeze.dims, aten.select.int, aten.slice.Tensor)
#: per-position ops that are not tagged pointwise in aten
_ELEMENTWISE = (aten._to_copy.default, aten.alias.default, aten.dropout.default, aten.__and__.Tensor,
                aten.__or__.Tensor, aten.__xor__.Tensor, aten.zeros_like.default, aten.ones_like.default,
                aten.full_like.default, aten.masked_fill.Tensor)

_RULES: dict[Any, Callable[[Step, Node, int], Node]] = {
    aten.linear.default: _first_input(lambda x: 1),
    aten.layer_norm.default: _first_input(lambda x: len(x.args[1])),  # type: ignore[arg-type]
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.log_softmax.int: _softmax,
    aten._log_softmax.default: _softmax,
    aten.matmul.default: _matmul,
    aten.bmm.default: _matmul,
    aten.mm.default: _matmul,
    aten.addmm.default: _addmm,
    aten._addmm_activation.default: _addmm,
    aten.scaled_dot_product_attention.default: _sdpa,
    aten.embedding.default: _embedding,
    aten.expand.default: _expand,
    **{op: _reshape for op in _RESHAPES},
    **{op: _layout for op in _LAYOUT},
    **{op: _pointwise for op in _ELEMENTWISE},
}

_KINDS = {
    "linear": (aten.linear.default, aten.addmm.default, aten._addmm_activation.default, aten.mm.default),
    "matmul": (aten.matmul.default, aten.bmm.default),
    "layer-norm": (aten.layer_norm.default,),
    "attention": (aten.scaled_dot_product_attention.default,),
    "softmax": (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default),
    "embedding": (aten.embedding.default,),
}


def _is_pointwise(target: Any) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags


def kind_of(node: Node) -> str:
    """Stats key of an op: linear, matmul, layer-norm, attention, softmax, embedding,
    elementwise, or layout (views, transposes, expands: no arithmetic)."""
    for kind, ops in _KINDS.items():
        if node.target in ops:
            return kind
    if node.target in _ELEMENTWISE or _is_pointwise(node.target):
        return "elementwise"
    return "layout"


def move(step: Step, x: Node, axis: int) -> Node:
    """``x`` computed on the selected positions of its output ``axis`` (a new node)."""
    rule = _RULES.get(x.target)
    if rule is None and _is_pointwise(x.target):
        rule = _pointwise
    if rule is None and x.target is operator.getitem and is_op(x.args[0], aten.split.Tensor, aten.split_with_sizes.default):
        raise NotPerPosition("part of a split whose other parts are read in full "
                             "(a fused Q/K/V linear: run prune-positions before fuse-qkv)")
    if rule is None:
        raise NotPerPosition(f"{x.target} is not known to act per position")
    return rule(step, x, axis)
