"""prune-positions: compute only the sequence positions the outputs read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from graphopt.passes._positions import NotPerPosition, Rows, kind_of, move

from graphopt.errors import GraphoptError
from graphopt.ir.fx import is_op, tensor_meta, where
from graphopt.ir.shapes import infer_val
from graphopt.passlib.costs import hint_shape
from graphopt.transform.base import Pass, PassResult, register_pass

__all__ = ["PrunePositions", "matmul_flops"]

aten = torch.ops.aten
Node = torch.fx.Node

_MATMULS = (aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default)
_ADDMMS = (aten.addmm.default, aten._addmm_activation.default, aten.baddbmm.default)


def _numel(node: Any, dims: slice = slice(None)) -> int:
    t = tensor_meta(node)
    n = 1
    for s in hint_shape(t)[dims] if t is not None else []:
        n *= s
    return n


def matmul_flops(gm: torch.fx.GraphModule) -> int:
    """Linear/matmul/attention FLOPs (2 per multiply-add) of one call at the example shape."""
    total = 0
    for node in gm.graph.nodes:
        if is_op(node, *_MATMULS):
            k = hint_shape(tensor_meta(node.args[0]))[-1]  # type: ignore[arg-type]
            total += 2 * _numel(node) * k
        elif is_op(node, *_ADDMMS):
            k = hint_shape(tensor_meta(node.args[1]))[-1]  # type: ignore[arg-type]
            total += 2 * _numel(node) * k
        elif is_op(node, aten.scaled_dot_product_attention.default):
            keys = hint_shape(tensor_meta(node.args[1]))[-2]  # type: ignore[arg-type]
            total += 2 * keys * (_numel(node.args[0]) + _numel(node))  # q @ k^T, then p @ v
    return total


def _seed(node: Node) -> tuple[Rows, bool] | None:
    """(positions, drops the axis) of a select/slice on dim 1 of a rank-3 activation."""
    if not is_op(node, aten.select.int, aten.slice.Tensor) or len(node.args) < 2:
        return None
    t = tensor_meta(node.args[0])
    if t is None or t.dim() != 3 or not isinstance(node.args[1], int) or node.args[1] % 3 != 1:
        return None
    if is_op(node, aten.select.int) and isinstance(node.args[2], int):
        return Rows.index(node.args[2]), True
    if is_op(node, aten.slice.Tensor):
        start, end, step = (list(node.args[2:]) + [None, None, None])[:3]
        rows = Rows(0 if start is None else start, 2**63 - 1 if end is None else end, step or 1)
        if all(isinstance(v, int) for v in (rows.start, rows.end, rows.step)) and not rows.full:
            return rows, False
    return None


@dataclass
class _Attempt:
    """One move of a selection through one op: nodes made, rows pruned, undo on failure."""

    gm: torch.fx.GraphModule
    sels: dict[Node, tuple[int, Rows, bool]]
    rows: Rows
    anchor: Node
    created: list[Node] = field(default_factory=list)
    pruned: dict[str, int] = field(default_factory=dict)

    def _new(self, target: Any, args: tuple, kwargs: dict | None = None) -> Node:
        node = self.gm.graph.call_function(target, args, kwargs or {})
        self.created.append(node)
        if not infer_val(node):
            raise NotPerPosition(f"could not infer the shape of {node.name}")
        return node

    def sel(self, node: Node, axis: int) -> Node:
        graph = self.gm.graph
        if node.op == "placeholder":
            point = graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1])
        else:
            point = graph.inserting_after(node)
        with point:
            s = self._new(aten.slice.Tensor, (node, axis, self.rows.start, self.rows.end, self.rows.step))
        self.sels[s] = (axis, self.rows, False)
        return s

    def length(self, selected: Node, axis: int) -> int | Node:
        if self.rows.single:
            return 1
        with self.gm.graph.inserting_after(selected):
            return self._new(aten.sym_size.int, (selected, axis))

    def emit(self, old: Node, target: Any, args: tuple, kwargs: dict | None = None) -> Node:
        with self.gm.graph.inserting_before(self.anchor):
            new = self._new(target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in old.meta:
                new.meta[key] = old.meta[key]
        kind = kind_of(old)
        if kind != "layout":
            rows = _numel(old, slice(None, -1)) - _numel(new, slice(None, -1))
            self.pruned[kind] = self.pruned.get(kind, 0) + rows
        return new

    def undo(self) -> None:
        for node in reversed(self.created):
            self.sels.pop(node, None)
            self.gm.graph.erase_node(node)


@register_pass
class PrunePositions(Pass):
    """Compute the ops after a position selection on the selected positions only.

    Matches: ``select``/``slice`` with constant indices on dim 1 of a
    [batch, seq, hidden] activation (``h[:, -1]``, ``h[:, -4:]``), and moves
    that selection up through every op proven to act per position: linears
    (also ``addmm``/``_addmm_activation`` between flatten/unflatten reshapes),
    layer norms, softmax off the axis, elementwise ops (activations, eval
    dropout, residual adds: each operand carrying the axis is selected too,
    broadcast operands stay), head ``view``/``reshape``/``transpose``/
    ``permute``, embeddings, and ``scaled_dot_product_attention`` (q and the
    mask's query rows are selected, k and v keep every position). It stops at a
    tensor also read in full elsewhere (the last layer's k/v input, a shared
    mask) and declines, with the reason, an op not proven per position (a
    pooling, a cumulative op, causal SDPA, attention dropout). Indexing with a
    tensor is not matched. A model with no such selection is left unchanged.
    Produces: the same outputs, with e.g. bert4rec's last encoder layer and
    output transform run on one row per sequence; moved views become
    ``reshape``. Stats: rows pruned per op kind at the example shape; details:
    linear/matmul/attention FLOPs before and after. Requires and preserves
    shapes. Exact (tested at 1e-5). In O2 it runs after fuse-attention (the
    attention is then one SDPA node whatever the model wrote) and before
    fuse-qkv, which would make the query a column slice of a Q/K/V linear
    read at every position (then only k/v are merged in the last layer).
    Before/after: ``select(ln(x + linear(gelu(linear(x)))), 1, -1)`` ->
    ``x1 = slice(x, 1, -1); select(ln(x1 + linear(gelu(linear(x1)))), 1, 0)``.
    """

    name = "prune-positions"
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})
    tolerance = 1e-5

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        if not any(_seed(n) for n in program.gm.graph.nodes):
            return PassResult(program, modified=False, notes=["no constant position selection on dim 1"])
        original, program = program, program.copy()  # kept unless some arithmetic moves
        gm = program.gm
        flops_before = matmul_flops(gm)
        sels: dict[Node, tuple[int, Rows, bool]] = {}
        seeds: list[Node] = []
        for node in gm.graph.nodes:
            seed = _seed(node)
            if seed is not None:
                sels[node] = (1, *seed)
                seeds.append(node)
        stops: dict[Node, str] = {}
        pruned: dict[str, int] = {}
        moved = 0
        progress = True
        while progress:
            progress = False
            for x in reversed(list(gm.graph.nodes)):
                if any(u in sels for u in x.users) and self._sink(gm, x, sels, stops, pruned):
                    moved += 1
                    progress = True
        if not any(pruned.values()):  # nothing, only views, or rows already one moved: leave the Program as it was
            return PassResult(original, modified=False, declined=[f"{where(x)}: {r}" for x, r in stops.items()])
        _dedupe(gm, sels)
        flops_after = matmul_flops(gm)
        saved = 100.0 * (flops_before - flops_after) / flops_before if flops_before else 0.0
        blocked = sorted(x.name for x, r in stops.items() if r.startswith("also read"))
        declined = [f"{where(x)}: {r}" for x, r in stops.items() if not r.startswith("also read")]
        notes = [f"{moved} ops moved behind {len(seeds)} position selection(s)",
                 f"linear/matmul/attention FLOPs at the example shape: {flops_before} -> {flops_after} "
                 f"(-{saved:.1f}%)"]
        if blocked:
            notes.append("stops at tensors read in full elsewhere: " + ", ".join(blocked))
        details = [{"flops_before": flops_before, "flops_after": flops_after,
                    "flops_saved_pct": round(saved, 2), "ops_moved": moved}]
        return PassResult(program, modified=True, stats=pruned, declined=declined, details=details, notes=notes)

    @staticmethod
    def _sink(gm: torch.fx.GraphModule, x: Node, sels: dict, stops: dict, pruned: dict) -> bool:
        """Replace ``x`` and its selections by ``x`` computed on the selected positions."""
        users = list(x.users)
        selections = [u for u in users if u in sels]
        keys = {sels[u][:2] for u in selections}
        sizes = [u for u in users if u not in sels and is_op(u, aten.sym_size.int)]
        others = [u for u in users if u not in sels and u not in sizes]
        if x.op != "call_function":
            return False
        if len(keys) > 1:
            stops[x] = "read by different position selections"
            return False
        if others:
            stops[x] = "also read in full by " + ", ".join(u.name for u in others[:3])
            return False
        axis, rows = next(iter(keys))
        if any(u.users and u.args[1] % tensor_meta(x).dim() == axis for u in sizes):  # type: ignore[union-attr]
            stops[x] = "its full length on the position axis is used"
            return False
        attempt = _Attempt(gm, sels, rows, anchor=x)
        try:
            y = move(attempt, x, axis)
        except NotPerPosition as e:
            attempt.undo()
            stops[x] = str(e)
            return False
        stops.pop(x, None)
        for u in selections:
            new = y
            if sels.pop(u)[2]:  # a select: the axis, now of length 1, goes
                with gm.graph.inserting_after(y):
                    new = gm.graph.call_function(aten.select.int, (y, axis, 0))
                infer_val(new)
            u.replace_all_uses_with(new)
            gm.graph.erase_node(u)
        for u in sizes:
            if u.users:
                with gm.graph.inserting_after(y):
                    size = gm.graph.call_function(aten.sym_size.int, (y, u.args[1]))
                infer_val(size)
                u.replace_all_uses_with(size)
            gm.graph.erase_node(u)
        _erase_dead(gm, [x])
        for kind, n in attempt.pruned.items():
            pruned[kind] = pruned.get(kind, 0) + n
        return True


def _erase_dead(gm: torch.fx.GraphModule, nodes: list[Node]) -> None:
    """Erase ``nodes`` and then their inputs, as long as they are unused and pure."""
    while nodes:
        node = nodes.pop()
        if node.users or node.op != "call_function" or node.is_impure(impure_random=False):
            continue
        inputs = [a for a in node.all_input_nodes]
        gm.graph.erase_node(node)
        nodes.extend(inputs)


def _dedupe(gm: torch.fx.GraphModule, sels: dict[Node, tuple[int, Rows, bool]]) -> None:
    """Identical selections of one tensor left at a stop become one, copied dense where strided."""
    first: dict[tuple, Node] = {}
    for node in list(gm.graph.nodes):
        if node in sels and is_op(node, aten.slice.Tensor):
            key = (node.args[0], *sels[node][:2])
            if key in first:
                node.replace_all_uses_with(first[key])
                gm.graph.erase_node(node)
            else:
                first[key] = node
    for node in first.values():
        _make_contiguous(gm, node)
    if any(n.op == "call_function" and "val" not in n.meta for n in gm.graph.nodes if n.users):
        raise GraphoptError("prune-positions left a node without meta['val']")


def _make_contiguous(gm: torch.fx.GraphModule, node: Node) -> None:
    """A selection left at a stop reads rows of a larger tensor: a strided view. Copy it
    to a dense tensor once (batch x rows x width, negligible), because the kernels that
    read it may not take strides: oneDNN's int8 matmul with the residual add as a
    ``binary_add`` post-op has no fast kernel for a strided addend and falls back to
    ``ref_int8`` (bert4rec:base, batch 32, last layer's attention output: 50 ms instead of
    0.03 ms on an AMX Xeon, measured with ONEDNN_VERBOSE=1)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.is_contiguous():
        return
    users = list(node.users)
    with gm.graph.inserting_after(node):
        dense = gm.graph.call_function(aten.clone.default, (node,), {"memory_format": torch.contiguous_format})
    infer_val(dense)
    for user in users:
        user.replace_input_with(node, dense)
