"""quantize-embeddings: row-wise 8/4-bit embedding tables, looked up as gather + per-row dequantize."""

from __future__ import annotations

import torch
import torch.fx

from graphopt.ir.fx import add_tensor_attr, fetch_attr
from graphopt.ir.shapes import infer_val
from graphopt.transform.base import Option, Pass, PassResult, register_pass

__all__ = ["QuantizeEmbeddings", "quantize_rows", "dequantize_rows", "TOLERANCE"]

aten = torch.ops.aten

#: measured max |error| (atol = rtol) on the zoo models, with margin: a 4-bit
#: row of N(0, 1) values has a step of ~0.5, so its outputs move far more
TOLERANCE = {8: 0.05, 4: 1.0}

_HALF_MIN_NORMAL = 2.0 ** -14


def _half_down(x: torch.Tensor) -> torch.Tensor:
    """The largest fp16 value <= ``x`` (elementwise)."""
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -torch.inf)), h)


def _half_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= ``x`` (elementwise)."""
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


def quantize_rows(table: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8, scale_offset (rows, 2) fp16)`` with ``w ~ code * scale + offset``.

    The layout of FBGEMM's fused row-wise tables: per row an asymmetric range
    ``[offset, offset + (2**bits - 1) * scale]`` that covers the row's min and
    max, stored as fp16 (offset rounded down, scale rounded up, so the range
    still covers every value and no code is clipped). Hence
    ``|code * scale + offset - w| <= scale / 2`` for every element. 4-bit codes
    pack two columns per byte (even column in the low nibble; an odd width
    gets a zero pad column). Raises ValueError for values beyond fp16's range.
    """
    w = table.detach().float()
    levels = (1 << bits) - 1
    lo16 = _half_down(w.amin(dim=1))
    scale16 = _half_up(((w.amax(dim=1) - lo16.float()) / levels).clamp_min(_HALF_MIN_NORMAL))
    if not (torch.isfinite(lo16).all() and torch.isfinite(scale16).all()):
        raise ValueError("table values exceed the fp16 range of the row scales/offsets")
    scale, lo = scale16.float(), lo16.float()
    codes = torch.round((w - lo[:, None]) / scale[:, None]).clamp(0, levels).to(torch.uint8)
    if bits == 4:
        if codes.shape[1] % 2:
            codes = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1)
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, torch.stack([scale16, lo16], dim=1)


def dequantize_rows(codes: torch.Tensor, scale_offset: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The fp32 table :func:`quantize_rows` stands for (reference for tests and reports)."""
    q = codes.int()
    if bits == 4:
        q = torch.stack([q % 16, q // 16], dim=-1).flatten(-2)[..., :dim]
    so = scale_offset.float()
    return q.float() * so[:, :1] + so[:, 1:]


@register_pass
class QuantizeEmbeddings(Pass):
    """Store embedding tables row-wise quantized (8 or 4 bits, fp16 scale + offset per row).

    Matches: ``aten.embedding`` and ``aten.embedding_bag(.padding_idx)`` whose
    table is a constant fp32 ``get_attr`` with at least ``min_rows`` rows and no
    other reader (a tied table, e.g. BERT4Rec's scoring head, is declined:
    both copies would stay). ``embedding_bag`` with a padding_idx is declined
    (run ``embedding-bag-to-gather`` first, as ``O2``/``Os`` do: its gather +
    masked sum then reads the dequantized rows).
    Produces: a uint8 code table (4-bit: two columns per byte) and a (rows, 2)
    fp16 scale/offset table (:func:`quantize_rows`); a lookup becomes a real
    gather of the codes and of the row's scale/offset, then a per-row
    dequantize: ``embedding(codes, ids).float() * scale + offset``. 4-bit
    codes are unpacked after the cast, ``high = floor(q / 16)``, ``low = q -
    16 high`` (exact in fp32; float ops TensorRT parses, bitwise ops it does
    not). A bag gathers and
    dequantizes its rows, then reduces them with ``embedding_bag`` over
    ``arange`` (same offsets, mode, per-sample weights). Every element is
    within ``scale / 2`` of the fp32 table. Requires shapes; preserves shapes.
    Approximate: tolerance 0.05 (8-bit) / 1.0 (4-bit), atol = rtol, measured
    on the zoo. Before/after: ``embedding(W, ids)`` ->
    ``embedding(W_u8, ids).float() * embedding(SO, ids)[..., :1] + embedding(SO, ids)[..., 1:]``.
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
    backend_notes = ("Gather + Cast/Mul/Add (4-bit: Floor/Sub unpack): ONNX Runtime and Inductor run it as is; "
                     "for TensorRT (no uint8 Gather) the export gathers the codes as int32 words. "
                     "Saves ~3.8x (8-bit) / ~7x (4-bit) table bytes at dim 64.")

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
            reason = self._decline(gm, node, table, bag)
            if reason:
                declined.append(f"{node.name}: {reason}")
                continue
            value = fetch_attr(gm, table.target)
            if table.target not in done:
                try:
                    codes, so = quantize_rows(value, self.bits)
                except ValueError as e:
                    declined.append(f"{node.name}: {e}")
                    continue
                base = table.target.replace(".", "_")
                done[table.target] = (add_tensor_attr(gm, base + f"_q{self.bits}", codes, before=table),
                                      add_tensor_attr(gm, base + "_scale_offset", so, before=table))
                details.append({"table": table.target, "rows": value.shape[0], "dim": value.shape[1],
                                "bytes_before": value.numel() * 4,
                                "bytes_after": codes.numel() + so.numel() * so.element_size()})
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

    def _decline(self, gm: torch.fx.GraphModule, node: torch.fx.Node, table: object, bag: bool) -> str | None:
        """Why ``node``'s table stays fp32, or None."""
        if not isinstance(table, torch.fx.Node) or table.op != "get_attr":
            return "table is computed, not a constant"
        value = fetch_attr(gm, table.target)
        if value.dtype != torch.float32 or value.dim() != 2 or value.shape[0] < self.min_rows:
            return f"table {tuple(value.shape)} {value.dtype} below min_rows {self.min_rows} or not a 2-D fp32 table"
        lookups = (aten.embedding.default, aten.embedding_bag.default, aten.embedding_bag.padding_idx)
        others = [u.name for u in table.users if u.target not in lookups]
        if others:
            return f"table {table.target} is also read by {', '.join(others)} (tied)"
        if bag and len(node.args) > 8 and node.args[8] is not None and node.args[8] >= 0:
            return f"embedding_bag with padding_idx={node.args[8]} (run embedding-bag-to-gather first)"
        return None

    def _lookup(self, graph: torch.fx.Graph, codes: torch.fx.Node, so: torch.fx.Node,
                ids: torch.fx.Node, dim: int) -> torch.fx.Node:
        def call(target, *args, **kwargs):  # type: ignore[no-untyped-def]
            n = graph.call_function(target, args, kwargs)
            infer_val(n)
            return n

        q = call(aten.embedding.default, codes, ids)  # gather: only the rows looked up are read
        qf = call(aten._to_copy.default, q, dtype=torch.float32)
        if self.bits == 4:  # two codes per byte, low nibble = even column; exact in fp32 (codes < 256)
            high = call(aten.floor.default, call(aten.mul.Tensor, qf, 0.0625))
            low = call(aten.sub.Tensor, qf, call(aten.mul.Tensor, high, 16.0))
            qf = call(aten.flatten.using_ints, call(aten.stack.default, [low, high], -1), -2, -1)
            if dim % 2:
                qf = call(aten.slice.Tensor, qf, -1, 0, dim)
        rows_so = call(aten._to_copy.default, call(aten.embedding.default, so, ids), dtype=torch.float32)
        scale = call(aten.slice.Tensor, rows_so, -1, 0, 1)
        offset = call(aten.slice.Tensor, rows_so, -1, 1, 2)
        return call(aten.add.Tensor, call(aten.mul.Tensor, qf, scale), offset)
