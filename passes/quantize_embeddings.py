"""quantize-embeddings: row-wise 8/4-bit embedding tables, looked up as gather + dequantize."""

from __future__ import annotations

import torch
import torch.fx

from graphopt.ir.fx import add_tensor_attr, fetch_attr
from graphopt.ir.shapes import infer_val
from graphopt.transform.base import Option, Pass, PassResult, register_pass

__all__ = ["QuantizeEmbeddings"]

aten = torch.ops.aten

#: measured max |error| (atol = rtol) on the zoo models, with margin: a 4-bit
#: row of N(0, 1) values has a step of ~0.5, so its outputs move far more
TOLERANCE = {8: 0.05, 4: 1.0}


def quantize_rows(table: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8, scale_offset (rows, 2) fp32)`` with ``w ~ code * scale + offset``.

    4-bit codes pack two columns per byte (even column in the low nibble).
    """
    w = table.detach().float()
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    codes = torch.round((w - lo[:, None]) / scale[:, None]).clamp(0, levels).to(torch.uint8)
    if bits == 4:
        if codes.shape[1] % 2:
            codes = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1)
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, torch.stack([scale, lo], dim=1)


@register_pass
class QuantizeEmbeddings(Pass):
    """Store embedding tables row-wise quantized (8 or 4 bits, scale + offset per row).

    Matches: ``aten.embedding`` and ``aten.embedding_bag(.padding_idx)`` whose
    table is a constant fp32 ``get_attr`` with at least ``min_rows`` rows and no
    other reader (a tied table, e.g. BERT4Rec's scoring head, is declined:
    both copies would stay). ``embedding_bag`` with a padding_idx is declined.
    Produces: a uint8 code table (4-bit: two columns per byte) and a (rows, 2)
    scale/offset table; a lookup becomes ``embedding(codes, ids)`` (+ nibble
    unpack) ``* scale + offset``; a bag gathers and dequantizes its rows, then
    reduces them with ``embedding_bag`` over ``arange`` (same offsets, mode,
    per-sample weights). Requires shapes; preserves shapes. Approximate:
    tolerance 0.05 (8-bit) / 1.0 (4-bit), atol = rtol, measured on the zoo.
    Before/after: ``embedding(W, ids)`` ->
    ``embedding(W_u8, ids) * embedding(SO, ids)[..., :1] + embedding(SO, ids)[..., 1:]``.
    """

    name = "quantize-embeddings"
    options = (
        Option("bits", int, 8, "bits per value", check=lambda v: None if v in (4, 8) else "must be 8 or 4"),
        Option("min_rows", int, 1024, "leave smaller tables in fp32",
               check=lambda v: None if v >= 0 else "must be >= 0"),
    )
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})
    exact = False
    tolerance = TOLERANCE[8]  # the default bits; validate() picks per bits
    backend_notes = "Plain gather + arithmetic: every backend runs it; saves 4x (8-bit) / ~7x (4-bit) table memory."

    def validate(self) -> None:
        self.tolerance = TOLERANCE[self.bits]

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm, graph = program.gm, program.gm.graph
        stats: dict[str, int] = {}
        declined: list[str] = []
        details = []
        done: dict[str, tuple[torch.fx.Node, torch.fx.Node]] = {}
        for node in list(graph.nodes):
            bag = node.op == "call_function" and node.target in (aten.embedding_bag.default,
                                                                 aten.embedding_bag.padding_idx)
            if not (bag or (node.op == "call_function" and node.target is aten.embedding.default)):
                continue
            table = node.args[0]
            if not isinstance(table, torch.fx.Node) or table.op != "get_attr":
                declined.append(f"{node.name}: table is computed, not a constant")
                continue
            value = fetch_attr(gm, table.target)
            if value.dtype != torch.float32 or value.shape[0] < self.min_rows:
                declined.append(f"{node.name}: table {tuple(value.shape)} {value.dtype} below min_rows "
                                f"{self.min_rows} or not fp32")
                continue
            others = [u.name for u in table.users if u.target not in (aten.embedding.default,
                      aten.embedding_bag.default, aten.embedding_bag.padding_idx)]
            if others:
                declined.append(f"{node.name}: table {table.target} is also read by {', '.join(others)} (tied)")
                continue
            if bag and len(node.args) > 8 and node.args[8] is not None and node.args[8] >= 0:
                declined.append(f"{node.name}: embedding_bag with padding_idx={node.args[8]}")
                continue
            if table.target not in done:
                codes, so = quantize_rows(value, self.bits)
                base = table.target.replace(".", "_")
                done[table.target] = (add_tensor_attr(gm, base + f"_q{self.bits}", codes, before=table),
                                      add_tensor_attr(gm, base + "_scale_offset", so, before=table))
                details.append({"table": table.target, "rows": value.shape[0], "dim": value.shape[1],
                                "bytes_before": value.numel() * 4,
                                "bytes_after": codes.numel() + so.numel() * 4})
            codes_node, so_node = done[table.target]
            with graph.inserting_before(node):
                ids = node.args[1]
                rows = self._lookup(graph, codes_node, so_node, ids, value.shape[1])
                if bag:
                    n = graph.call_function(aten.sym_size.int, (ids, 0))
                    infer_val(n)
                    pos = graph.call_function(aten.arange.default, (n,), {"dtype": torch.int64})
                    infer_val(pos)
                    new = graph.call_function(node.target, (rows, pos, *node.args[2:]), dict(node.kwargs))
                else:
                    new = rows
            infer_val(new)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            if not table.users:
                graph.erase_node(table)
            kind = "embedding-bag" if bag else "embedding"
            stats[kind] = stats.get(kind, 0) + 1
        return PassResult(program, modified=bool(stats), stats=stats, declined=declined, details=details)

    def _lookup(self, graph: torch.fx.Graph, codes: torch.fx.Node, so: torch.fx.Node,
                ids: torch.fx.Node, dim: int) -> torch.fx.Node:
        def call(target, *args, **kwargs):  # type: ignore[no-untyped-def]
            n = graph.call_function(target, args, kwargs)
            infer_val(n)
            return n

        q = call(aten.embedding.default, codes, ids)
        if self.bits == 4:
            low = call(aten.bitwise_and.Scalar, q, 15)
            high = call(aten.bitwise_right_shift.Tensor_Scalar, q, 4)
            pair = call(aten.stack.default, [low, high], -1)
            flat = call(aten.flatten.using_ints, pair, -2, -1)
            q = call(aten.slice.Tensor, flat, -1, 0, dim) if dim % 2 else flat
        qf = call(aten._to_copy.default, q, dtype=torch.float32)
        rows_so = call(aten.embedding.default, so, ids)
        scale = call(aten.slice.Tensor, rows_so, -1, 0, 1)
        offset = call(aten.slice.Tensor, rows_so, -1, 1, 2)
        return call(aten.add.Tensor, call(aten.mul.Tensor, qf, scale), offset)
