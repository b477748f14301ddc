"""Coupled-parameter groups: every parameter slice that must shrink together
when one channel (or one attention head) goes away (Torch-Pruning's idea,
on the Program's own def-use chains).

* Channel groups (:func:`find_channel_groups`): a linear's output rows, the
  elementwise ops after it (activations, eval dropout, 2-D BatchNorm, whose
  weight/bias/running stats shrink too) and the input columns of every linear
  that reads the result. Transformer FFNs (the down projection feeds a
  residual ``add``) are ``kind="ffn"``, everything else ``kind="mlp"``.
* Head groups (:func:`find_head_groups`): for each SDPA, the Q/K/V linears'
  rows of a head (``head_dim`` rows each, also inside a fused QKV linear that
  is split by ``split``/``split_with_sizes``/``slice``), the output
  projection's input columns, and every literal head count in the view shapes
  and split sizes on the way.

Pure analysis: nothing here changes the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt.ir.fx import fetch_attr, is_op, module_path, tensor_meta
from graphopt.ir.fx import where as node_where

__all__ = ["ParamSlice", "ShapeEdit", "PruneGroup", "find_channel_groups", "find_head_groups", "slice_bounds",
           "slice_index"]

aten = torch.ops.aten

_ELEMENTWISE = (
    aten.relu, aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.leaky_relu, aten.hardtanh,
    aten.elu, aten.hardswish, aten.mish, aten.clone, aten.dropout,
)
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view)
_BN = aten._native_batch_norm_legit_no_training.default
_SPLITS = (aten.split_with_sizes, aten.split)


@dataclass
class ParamSlice:
    """Channel ``c`` of a group owns indices ``offset + c*width ... + width``
    along ``dim`` of the tensor in ``node.args[arg]`` (a get_attr)."""

    node: torch.fx.Node
    arg: int
    dim: int
    offset: int
    width: int
    score: bool = True  # counts towards importance (weights/biases, not BN stats)


@dataclass
class ShapeEdit:
    """A literal in a view shape / split size that scales with kept channels.

    ``node.args[arg]`` is a list; entry ``index`` becomes ``kept * per_channel``
    (split sizes: ``old - removed * per_channel``)."""

    node: torch.fx.Node
    arg: int
    index: int
    per_channel: int
    mode: str = "view"  # "view": kept*per_channel if literal; "shrink": old - removed*per_channel


@dataclass
class PruneGroup:
    name: str  # module path of the layer, e.g. model.bert.encoder.layer.0.attention.self
    kind: str  # "heads" | "ffn" | "mlp"
    size: int  # channels (or heads)
    width: int  # indices per channel (head_dim for heads, 1 otherwise)
    slices: list[ParamSlice] = field(default_factory=list)
    edits: list[ShapeEdit] = field(default_factory=list)
    slice_nodes: list[torch.fx.Node] = field(default_factory=list)  # aten.slice on fused outputs


# ----------------------------------------------------------------- analysis
def _param(node: torch.fx.Node, arg: int) -> torch.fx.Node | None:
    """The get_attr node at ``node.args[arg]`` when it is read by ``node`` only."""
    if len(node.args) <= arg:
        return None
    p = node.args[arg]
    if isinstance(p, torch.fx.Node) and p.op == "get_attr" and len(p.users) == 1:
        return p
    return None


def _linear_ok(node: torch.fx.Node) -> str | None:
    if _param(node, 1) is None:
        return "weight is not a parameter of its own (shared or computed)"
    if len(node.args) > 2 and node.args[2] is not None and _param(node, 2) is None:
        return "bias is not a parameter of its own"
    return None


def _linear_slices(node: torch.fx.Node, *, rows: bool, offset: int, width: int) -> list[ParamSlice]:
    if not rows:
        return [ParamSlice(node, 1, 1, offset, width)]
    out = [ParamSlice(node, 1, 0, offset, width)]
    if len(node.args) > 2 and node.args[2] is not None:
        out.append(ParamSlice(node, 2, 0, offset, width))
    return out


def _last_dim(node: torch.fx.Node, dim: Any) -> bool:
    val = tensor_meta(node)
    return isinstance(dim, int) and val is not None and dim in (-1, val.dim() - 1)


def _residual_after(node: torch.fx.Node) -> bool:
    """The output (through dropout clones) feeds an ``add``: a transformer block."""
    seen = [node]
    while seen:
        n = seen.pop()
        for u in n.users:
            if is_op(u, aten.add):
                return True
            if is_op(u, aten.clone, aten.dropout):
                seen.append(u)
    return False


def find_channel_groups(gm: torch.fx.GraphModule) -> tuple[list[PruneGroup], list[str]]:
    """Linear -> elementwise/BN* -> linear(s) groups; (groups, declined reasons)."""
    groups: list[PruneGroup] = []
    declined: list[str] = []
    for lin in gm.graph.nodes:
        if not is_op(lin, aten.linear) or not lin.users:
            continue
        where = module_path(lin) or lin.name
        why = _linear_ok(lin)
        slices: list[ParamSlice] = []
        activation = False
        consumers: list[torch.fx.Node] = []
        frontier = [lin]
        while frontier and why is None:
            n = frontier.pop()
            for u in n.users:
                if is_op(u, aten.linear) and u.args[0] is n and u.args[1] is not n:
                    if _linear_ok(u) is not None:
                        why = f"{u.name}: {_linear_ok(u)}"
                    consumers.append(u)
                elif is_op(u, *_ELEMENTWISE) and u.args[0] is n:
                    activation |= not is_op(u, aten.clone, aten.dropout)
                    frontier.append(u)
                elif u.target is _BN and u.args[0] is n and tensor_meta(n) is not None and tensor_meta(n).dim() == 2:
                    for arg in (1, 2, 3, 4):
                        if u.args[arg] is not None:
                            if _param(u, arg) is None:
                                why = f"{u.name}: BatchNorm parameter is shared"
                            slices.append(ParamSlice(u, arg, 0, 0, 1, score=False))
                    for g in u.users:
                        if g.args[1] == 0:
                            frontier.append(g)
                        elif g.users:
                            why = f"{u.name}: BatchNorm statistics output is used"
                else:
                    why = f"output feeds {u.name} ({u.target}); only activations, BatchNorm and linears are followed"
                    break
        if why is None and not consumers:
            why = "no linear reads its output"
        if why is not None:  # with the node: a linear called twice declines twice
            declined.append(f"{node_where(lin)}: {why}")
            continue
        out_features = fetch_attr(gm, lin.args[1].target).shape[0]  # a parameter: _linear_ok said so
        slices = _linear_slices(lin, rows=True, offset=0, width=1) + slices
        for c in consumers:
            slices += _linear_slices(c, rows=False, offset=0, width=1)
        kind = "ffn" if activation and any(_residual_after(c) for c in consumers) else "mlp"
        groups.append(PruneGroup(where, kind, int(out_features), 1, slices))
    return groups, declined


def _to_heads(node: Any) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``transpose(view(x, [b, s, H, hd]), 1, 2)`` -> (view, x)."""
    if not isinstance(node, torch.fx.Node):
        return None
    if is_op(node, aten.transpose) and sorted(node.args[1:3]) == [1, 2]:
        pass
    elif is_op(node, aten.permute) and list(node.args[1]) == [0, 2, 1, 3]:
        pass
    else:
        return None
    view = node.args[0]
    if not (isinstance(view, torch.fx.Node) and is_op(view, *_VIEWS) and len(view.users) == 1):
        return None
    val = tensor_meta(view)
    if val is None or val.dim() != 4:
        return None
    return view, view.args[0]


def _source(node: torch.fx.Node, edits: list[ShapeEdit], slices_out: list[torch.fx.Node]) -> tuple[torch.fx.Node, int] | None:
    """Walk a Q/K/V tensor back to its linear: (linear, row offset)."""
    if is_op(node, aten.linear):
        return (node, 0) if len(node.users) == 1 else None
    if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        split, i = node.args[0], node.args[1]
        if not (is_op(split, *_SPLITS) and isinstance(split.args[0], torch.fx.Node)):
            return None
        lin = split.args[0]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if not is_op(lin, aten.linear) or not _last_dim(lin, dim) or len(lin.users) != 1:
            return None
        sizes = split.args[1]
        if isinstance(sizes, int):  # split.Tensor: equal chunks; every chunk must shrink alike
            return lin, i * sizes
        offset = sum(sizes[:i])
        edits.append(ShapeEdit(split, 1, i, 0, mode="split"))
        return lin, offset
    if is_op(node, aten.slice) and isinstance(node.args[0], torch.fx.Node) and is_op(node.args[0], aten.linear):
        lin = node.args[0]
        if not _last_dim(lin, node.args[1]) or len(node.args) < 3 or not all(is_op(u, aten.slice) for u in lin.users):
            return None
        size = tensor_meta(lin).shape[-1]  # _last_dim: the meta is there
        bounds = slice_bounds(node, int(size))
        if bounds is None:
            return None
        slices_out.append(node)
        return lin, bounds[0]
    return None


def slice_bounds(node: torch.fx.Node, size: int) -> tuple[int, int] | None:
    """``aten.slice``'s (start, end) as offsets in [0, size] (a negative one counts from the end, as
    ``t[..., -n:]`` does); None for a step other than 1."""
    args = list(node.args) + [None] * (5 - len(node.args))
    if args[4] not in (None, 1):
        return None
    start, end = (0 if args[2] is None else args[2]), (size if args[3] is None else args[3])
    if not (isinstance(start, int) and isinstance(end, int)):
        return None
    return tuple(min(max(v + size if v < 0 else v, 0), size) for v in (start, end))  # type: ignore[return-value]


def _heads_edit(view: torch.fx.Node, index: int, per_channel: int, edits: list[ShapeEdit]) -> None:
    """Record a literal head count (``per_channel=1``) or width (``head_dim``) in a view shape."""
    shape = view.args[1]
    if isinstance(shape[index], int) and shape[index] != -1:
        edits.append(ShapeEdit(view, 1, index, per_channel))


def find_head_groups(gm: torch.fx.GraphModule) -> tuple[list[PruneGroup], list[str]]:
    """One group per SDPA whose Q/K/V come from linears and whose output goes
    (view, transpose, view) into one output-projection linear."""
    groups: list[PruneGroup] = []
    declined: list[str] = []
    for sdpa in gm.graph.nodes:
        if not is_op(sdpa, aten.scaled_dot_product_attention):
            continue
        where = module_path(sdpa) or sdpa.name
        edits: list[ShapeEdit] = []
        slice_nodes: list[torch.fx.Node] = []
        sources = []
        for arg in sdpa.args[:3]:
            heads = _to_heads(arg)
            src = _source(heads[1], edits, slice_nodes) if heads else None
            if heads is None or src is None:
                sources = []
                break
            sources.append((heads[0], *src))
        if not sources:
            declined.append(f"{where}: Q/K/V are not linear -> view [b, s, heads, head_dim] -> transpose")
            continue
        shapes = [tuple(tensor_meta(v).shape[2:]) for v, _, _ in sources]
        if len(set(shapes)) != 1 or not all(isinstance(x, int) for x in shapes[0]):
            declined.append(f"{where}: Q/K/V head counts differ (grouped-query attention is not pruned)")
            continue
        n_heads, head_dim = shapes[0]
        mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
        mval = tensor_meta(mask) if isinstance(mask, torch.fx.Node) else None
        if mval is not None and mval.dim() >= 3 and mval.shape[-3] != 1:  # [H, L, S] broadcasts per head too
            declined.append(f"{where}: attention mask has a per-head dim ({mval.shape[-3]} at dim -3); "
                            "heads are pruned only under a mask shared by all heads")
            continue
        # output side: [view [b,H,s,hd]] -> transpose(1,2) -> [clone] -> view [b,s,H*hd] -> linear
        n, ok = sdpa, True
        if len(n.users) == 1 and is_op(next(iter(n.users)), *_VIEWS):
            n = next(iter(n.users))
            _heads_edit(n, 1, 1, edits)
        t = next(iter(n.users)) if len(n.users) == 1 else None
        if t is None or not ((is_op(t, aten.transpose) and sorted(t.args[1:3]) == [1, 2]) or
                             (is_op(t, aten.permute) and list(t.args[1]) == [0, 2, 1, 3])):
            ok = False
        else:
            n = t
            while ok and len(n.users) == 1 and is_op(next(iter(n.users)), aten.clone):
                n = next(iter(n.users))
            merge = next(iter(n.users)) if len(n.users) == 1 else None
            if merge is None or not is_op(merge, *_VIEWS) or len(merge.users) != 1:
                ok = False
            else:
                _heads_edit(merge, len(merge.args[1]) - 1, head_dim, edits)
                out_proj = next(iter(merge.users))
                ok = is_op(out_proj, aten.linear) and out_proj.args[0] is merge and _linear_ok(out_proj) is None
        if not ok:
            declined.append(f"{where}: attention output does not reach one output projection through transpose/view")
            continue
        bad = [lin.name for _, lin, _ in sources if _linear_ok(lin) is not None]
        if bad:
            declined.append(f"{where}: {bad[0]}: {_linear_ok(sources[0][1])}")
            continue
        slices: list[ParamSlice] = []
        for view, lin, offset in sources:
            _heads_edit(view, 2, 1, edits)
            slices += _linear_slices(lin, rows=True, offset=offset, width=head_dim)
        slices += _linear_slices(out_proj, rows=False, offset=0, width=head_dim)
        # split.Tensor with an int size: every chunk is one of Q/K/V of this SDPA
        for _, lin, _ in sources:
            for u in lin.users:
                if is_op(u, aten.split) and isinstance(u.args[1], int):
                    chunks = fetch_attr(gm, lin.args[1].target).shape[0] // u.args[1]
                    if chunks != len({off for _, ln, off in sources if ln is lin}):
                        ok = False
                    edits.append(ShapeEdit(u, 1, -1, head_dim, mode="int"))
        if not ok:
            declined.append(f"{where}: fused projection has chunks outside this attention")
            continue
        groups.append(PruneGroup(where, "heads", int(n_heads), int(head_dim), slices, _dedup(edits), slice_nodes))
    return groups, declined


def _dedup(edits: list[ShapeEdit]) -> list[ShapeEdit]:
    seen, out = set(), []
    for e in edits:
        key = (e.node, e.arg, e.index, e.mode)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def slice_index(s: ParamSlice, channel: int) -> torch.Tensor:
    """Indices along ``s.dim`` of channel ``channel`` in slice ``s``."""
    start = s.offset + channel * s.width
    return torch.arange(start, start + s.width)
