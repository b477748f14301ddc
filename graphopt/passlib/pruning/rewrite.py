"""Apply pruning decisions: new, smaller weights (through
:func:`graphopt.ir.fx.add_tensor_attr`; old ``get_attr`` nodes erased) and the
literal shapes (head counts in views, split sizes) that go with them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from graphopt.ir.fx import add_tensor_attr, fetch_attr, is_op
from graphopt.passlib.pruning.groups import PruneGroup, slice_bounds, slice_index

__all__ = ["apply_groups"]

aten = torch.ops.aten


def _replace_param(gm: torch.fx.GraphModule, node: torch.fx.Node, arg: int, value: torch.Tensor) -> None:
    old = node.args[arg]
    base = old.target.replace(".", "_") + "_pruned"
    new = add_tensor_attr(gm, base, value, before=old)
    args = list(node.args)
    args[arg] = new
    node.args = tuple(args)
    if not old.users:
        gm.graph.erase_node(old)


def _apply_edits(g: PruneGroup, removed: int) -> None:
    for e in g.edits:
        args = list(e.node.args)
        if e.mode == "int":  # split.Tensor: one chunk size for Q, K and V
            args[e.arg] = args[e.arg] - removed * g.width
        else:
            values = list(args[e.arg])
            if e.mode == "view":
                values[e.index] = (g.size - removed) * e.per_channel
            else:  # "split": split_with_sizes entry of this group's chunk
                values[e.index] = values[e.index] - removed * g.width
            args[e.arg] = values
        e.node.args = tuple(args)


def apply_groups(
    gm: torch.fx.GraphModule, groups: Sequence[PruneGroup], removals: Sequence[Sequence[int]]
) -> list[dict[str, Any]]:
    """Shrink every group by its removed channels (rows, columns, BN vectors,
    view/split literals). Returns one record per changed group: layer, kind,
    removed/kept channels, parameters removed and linear FLOPs removed per
    row of activations (2 x weight elements removed)."""
    todo = [(g, sorted(rm)) for g, rm in zip(groups, removals) if rm]
    # dropped indices per (node, arg, dim): a fused QKV weight holds three slices
    drops: dict[tuple[torch.fx.Node, int, int], set[int]] = {}
    for g, rm in todo:
        for s in g.slices:
            drops.setdefault((s.node, s.arg, s.dim), set()).update(
                i for c in rm for i in slice_index(s, c).tolist()
            )
    details = []
    for g, rm in todo:
        params = sum(len(drops[(s.node, s.arg, s.dim)]) *
                     fetch_attr(gm, s.node.args[s.arg].target).numel() //
                     fetch_attr(gm, s.node.args[s.arg].target).shape[s.dim]
                     for s in {(s.node, s.arg, s.dim): s for s in g.slices}.values())
        flops = sum(2 * len(drops[(s.node, s.arg, s.dim)]) * fetch_attr(gm, s.node.args[s.arg].target).shape[1 - s.dim]
                    for s in {(s.node, s.arg, s.dim): s for s in g.slices}.values()
                    if is_op(s.node, aten.linear) and s.arg == 1)
        details.append({"layer": g.name, "kind": g.kind, "removed": rm, "kept": g.size - len(rm), "of": g.size,
                        "params_removed": int(params), "flops_removed_per_row": int(flops)})
        _apply_edits(g, len(rm))
        for sl in g.slice_nodes:  # fused output read by aten.slice: shift start/end
            dropped = drops.get((sl.args[0], 1, 0), set())
            size = fetch_attr(gm, sl.args[0].args[1].target).shape[0]  # rows before the drop (applied below)
            args = (list(sl.args) + [None, None])[:max(len(sl.args), 4)]
            for k, v in zip((2, 3), slice_bounds(sl, size)):  # a negative start/end counts from the end
                args[k] = v - sum(1 for i in dropped if i < v)
            sl.args = tuple(args)
    for (node, arg, dim), dropped in drops.items():
        tensor = fetch_attr(gm, node.args[arg].target).detach()
        keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in dropped], dtype=torch.long)
        _replace_param(gm, node, arg, tensor.index_select(dim, keep).clone())
    return details
