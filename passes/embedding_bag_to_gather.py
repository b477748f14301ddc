"""embedding-bag-to-gather: EmbeddingBag becomes an embedding gather + segment reduction."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from graphopt.passes._patterns import constant_tensor, copy_meta
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphopt.ir.fx import is_op, tensor_meta
from graphopt.transform.base import register_pass
from graphopt.transform.rewrite import Match, RewritePass, Rule

__all__ = ["EmbeddingBagToGather", "EmbeddingBagAsGather"]

aten = torch.ops.aten
_MODES = {0: "sum", 1: "mean"}
_FLATTENS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _parse(node: torch.fx.Node) -> dict[str, Any]:
    names = ["weight", "indices", "offsets", "scale_grad", "mode", "sparse", "psw", "include_last", "padding_idx"]
    values = dict(zip(names, node.args))
    values.update({k: v for k, v in node.kwargs.items()})
    values.setdefault("psw", node.kwargs.get("per_sample_weights"))
    values.setdefault("include_last", node.kwargs.get("include_last_offset", False))
    values.setdefault("padding_idx", None)
    values.setdefault("mode", 0)
    return values


def _fixed_bags(indices: torch.fx.Node, offsets: torch.fx.Node) -> torch.fx.Node | None:
    """The 2-D [bags, L] id tensor when ``indices = x.view(-1)`` and
    ``offsets = arange(0, bags * L, L)`` (what nn.EmbeddingBag does for 2-D input)."""
    if not (is_op(indices, *_FLATTENS) and is_op(offsets, aten.arange.start_step)):
        return None
    src = indices.args[0]
    start, end, step = offsets.args[:3]
    src_val = tensor_meta(src)
    if src_val is None or src_val.dim() != 2 or start != 0 or not isinstance(step, int):
        return None
    if not (isinstance(src_val.shape[1], int) and src_val.shape[1] == step):
        return None
    end_val = end.meta.get("val") if isinstance(end, torch.fx.Node) else end
    if end_val is None or not statically_known_true(end_val == src_val.shape[0] * step):
        return None
    return src  # type: ignore[return-value]


@dataclass(eq=False)
class _Bag(Match):
    a: dict[str, Any]  # the embedding_bag's arguments by name (see _parse)


class EmbeddingBagAsGather(Rule[_Bag]):
    """A sum/mean ``embedding_bag`` becomes ``embedding`` + a reduction (fixed bags or offsets)."""

    name = "embedding-bag"  # counted as {sum,mean}-{fixed-bags,offsets}

    def match(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Bag | None:
        if not is_op(node, aten.embedding_bag.default, aten.embedding_bag.padding_idx):
            return None
        return _Bag(node, _parse(node))

    def check(self, gm: torch.fx.GraphModule, match: _Bag) -> str | None:
        node, a = match.node, match.a
        if a["mode"] not in _MODES:
            return "mode=max has no gather + reduce rewrite here"
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in node.users):
            return "offset2bag/bag_size outputs are read"
        idx, off = tensor_meta(a["indices"]), tensor_meta(a["offsets"])
        if idx is None or idx.dim() != 1 or off is None or off.dim() != 1:
            return "indices/offsets are not 1-D tensors with shape metadata"
        padding = a["padding_idx"]
        if padding is not None and padding < 0:
            return f"negative padding_idx {padding}"
        if constant_tensor(gm, a["weight"]) is None:
            return "table is not a constant"
        return None

    def rewrite(self, gm: torch.fx.GraphModule, match: _Bag) -> dict[torch.fx.Node, torch.fx.Node]:
        node, a = match.node, match.a
        src = _fixed_bags(a["indices"], a["offsets"])
        match.kind = f"{_MODES[a['mode']]}-{'fixed-bags' if src is not None else 'offsets'}"
        before = set(gm.graph.nodes)
        with gm.graph.inserting_before(node):
            out = self._fixed(gm.graph, a, src) if src is not None else self._segments(gm.graph, a)
        for new in gm.graph.nodes:
            if new not in before:
                copy_meta(new, node)
        return {user: out for user in node.users}  # getitem(bag, 0); the flatten/arange feeding it die too

    @staticmethod
    def _masked_rows(graph: torch.fx.Graph, a: dict[str, Any], ids: torch.fx.Node) -> tuple[Any, Any]:
        """Gathered rows with per-sample weights and padding applied; the keep mask (or None)."""
        rows = graph.call_function(aten.embedding.default, (a["weight"], ids))
        keep = None
        if a["padding_idx"] is not None:
            ne = graph.call_function(aten.ne.Scalar, (ids, a["padding_idx"]))
            dtype = tensor_meta(a["weight"]).dtype  # type: ignore[union-attr]
            keep = graph.call_function(aten._to_copy.default, (ne,), {"dtype": dtype})
            rows = graph.call_function(aten.mul.Tensor, (rows, graph.call_function(aten.unsqueeze.default, (keep, -1))))
        return rows, keep

    def _fixed(self, graph: torch.fx.Graph, a: dict[str, Any], src: torch.fx.Node) -> torch.fx.Node:
        rows, keep = self._masked_rows(graph, a, src)  # [B, L, D]
        if a["psw"] is not None:
            length = tensor_meta(src).shape[1]  # type: ignore[union-attr]
            w = graph.call_function(aten.reshape.default, (a["psw"], [-1, length, 1]))
            rows = graph.call_function(aten.mul.Tensor, (rows, w))
        if a["mode"] == 1 and keep is None:
            return graph.call_function(aten.mean.dim, (rows, [1]))
        total = graph.call_function(aten.sum.dim_IntList, (rows, [1]))
        if a["mode"] == 0:
            out = total
        else:
            count = graph.call_function(aten.sum.dim_IntList, (keep, [1], True))
            count = graph.call_function(aten.clamp_min.default, (count, 1.0))
            out = graph.call_function(aten.div.Tensor, (total, count))
        return out

    def _segments(self, graph: torch.fx.Graph, a: dict[str, Any]) -> torch.fx.Node:
        """Bag of each id in O(N + B): a 1 at each bag start (``index_add`` counts empty bags'
        shared starts), ``cumsum`` - 1. With include_last_offset the ids from offsets[-1] on
        land in one extra bag that is dropped, as EmbeddingBag ignores them."""
        ids, offsets = a["indices"], a["offsets"]
        rows, keep = self._masked_rows(graph, a, ids)  # [N, D]
        if a["psw"] is not None:
            w = graph.call_function(aten.unsqueeze.default, (a["psw"], -1))
            rows = graph.call_function(aten.mul.Tensor, (rows, w))
        call = graph.call_function
        marks = call(aten.constant_pad_nd.default, (call(aten.zeros_like.default, (ids,), {"dtype": torch.int64}), [0, 1]))
        if tensor_meta(offsets).dtype != torch.int64:  # type: ignore[union-attr]  # ONNX scatter indices are int64
            offsets = call(aten._to_copy.default, (offsets,), {"dtype": torch.int64})
        starts = call(aten.ones_like.default, (offsets,), {"dtype": torch.int64})
        marks = call(aten.index_add.default, (marks, 0, offsets, starts))  # [N + 1]: offsets may equal N
        seg = call(aten.sub.Tensor, (call(aten.slice.Tensor, (call(aten.cumsum.default, (marks, 0)), 0, 0, -1)), 1))
        bags = call(aten.sym_size.int, (offsets, 0))  # with include_last_offset: B + 1, the last one dropped
        dim = tensor_meta(a["weight"]).shape[1]  # type: ignore[union-attr]
        total = call(aten.index_add.default, (call(aten.new_zeros.default, (rows, [bags, dim])), 0, seg, rows))
        if a["mode"] == 1:
            ones = keep if keep is not None else call(
                aten.ones_like.default, (ids,), {"dtype": tensor_meta(a["weight"]).dtype})  # type: ignore[union-attr]
            count = call(aten.index_add.default, (call(aten.new_zeros.default, (rows, [bags])), 0, seg, ones))
            count = call(aten.clamp_min.default, (count, 1.0))
            total = call(aten.div.Tensor, (total, call(aten.unsqueeze.default, (count, -1))))
        return call(aten.slice.Tensor, (total, 0, 0, -1)) if a["include_last"] else total


@register_pass
class EmbeddingBagToGather(RewritePass):
    """Rewrite ``aten.embedding_bag`` as ``embedding`` + a Loop-free reduction.

    Matches: ``aten.embedding_bag`` / ``embedding_bag.padding_idx`` in sum or
    mean mode (max is declined), with or without ``per_sample_weights`` and
    ``padding_idx``, whose only read output is item 0.
    Produces, for fixed-size bags (2-D input flattened with
    ``offsets = arange(0, B*L, L)``, as nn.EmbeddingBag emits): ``embedding(W,
    ids[B, L])`` then ``sum``/``mean`` over dim 1; for 1-D input with offsets:
    ``embedding(W, ids[N])``, bag ids ``seg = cumsum(zeros(N + 1).index_add(0,
    offsets, 1))[:N] - 1`` and ``zeros(B, D).index_add(0, seg, rows)`` (O(N + B)
    memory); with include_last_offset, ids from offsets[-1] on go to one
    extra bag that is dropped (EmbeddingBag ignores them). Padding ids are
    masked out of sums and counts; an empty bag gives zeros, as EmbeddingBag
    does. Records which inputs are the bags' offsets in
    ``Program.meta["bag_offsets"]`` for the runtime input contract. The ONNX export of the
    result has Gather/ReduceSum/ScatterND and no ``Loop``. Requires and preserves shapes.
    Exact up to summation order (tested at 1e-5).
    Before/after: ``embedding_bag(W, x.view(-1), arange(0, 3B, 3), mode=sum)[0]``
    -> ``sum(embedding(W, x), [1])``.
    """

    name = "embedding-bag-to-gather"
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})
    tolerance = 1e-5
    backend_notes = "ONNX Runtime: the dynamo export of embedding_bag is a Loop; this is Gather + ReduceSum"

    def rules(self) -> list[EmbeddingBagAsGather]:
        return [EmbeddingBagAsGather()]

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        from graphopt.runtime.contract import bag_offsets

        offsets = bag_offsets(program)  # read while the embedding_bag ops are still in the graph
        result = super().run(program, ctx)
        if offsets and result.modified:
            result.program.meta["bag_offsets"] = offsets
        return result
