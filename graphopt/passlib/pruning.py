"""Structured pruning core: coupled-channel groups, importance, slicing, recovery.

Torch-Pruning's idea on the Program's own def-use chains: a *group* is every
parameter slice that must shrink together when one channel goes away.

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

Groups are pure analysis; :func:`apply_groups` rewrites the graph (new, smaller
weights through :func:`graphopt.fx_utils.add_tensor_attr`; old ``get_attr``
nodes erased). Importance is per channel, summed over the group's weight
slices: ``l1`` (sum |w|), ``l2`` (L2 norm per slice) or ``taylor`` (sum
|w * dL/dw| over calibration batches, :func:`taylor_saliency`).

Recovery: :func:`recover` fine-tunes a pruned Program's weights for a few steps
by distillation to the unpruned Program's outputs (MSE). The ``graphopt
finetune`` CLI verb (issue 8) is the intended front end; it can call this.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt.errors import PassOptionError, PreconditionError
from graphopt.ir.fx import add_tensor_attr, fetch_attr, is_op, module_path, tensor_meta

__all__ = [
    "CRITERIA",
    "ParamSlice",
    "ShapeEdit",
    "PruneGroup",
    "check_ratio",
    "find_channel_groups",
    "find_head_groups",
    "group_importance",
    "taylor_saliency",
    "select_removals",
    "apply_groups",
    "run_ratio_prune",
    "recover",
]

log = logging.getLogger(__name__)
aten = torch.ops.aten

CRITERIA = ("l1", "l2", "taylor")

_ELEMENTWISE = (
    aten.relu, aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.leaky_relu, aten.hardtanh,
    aten.elu, aten.hardswish, aten.mish, aten.clone, aten.dropout,
)
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view)
_BN = aten._native_batch_norm_legit_no_training.default
_SPLITS = (aten.split_with_sizes, aten.split)


def check_ratio(ratio: float) -> str | None:
    """Option check shared by the pruning passes: ratio in [0, 1)."""
    if not 0.0 <= ratio < 1.0:
        return f"ratio must be in [0, 1), got {ratio}; 0 keeps everything, 0.5 removes half"
    return None


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
        out_features = fetch_attr(gm, lin.args[1].target).shape[0] if isinstance(lin.args[1], torch.fx.Node) else 0
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
        if why is not None:
            declined.append(f"{where}: {why}")
            continue
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
        slices_out.append(node)
        return lin, int(node.args[2] or 0)
    return None


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
        if mval is not None and mval.dim() == 4 and mval.shape[1] != 1:
            declined.append(f"{where}: attention mask has a per-head dim")
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


# --------------------------------------------------------------- importance
def _slice_index(s: ParamSlice, channel: int) -> torch.Tensor:
    start = s.offset + channel * s.width
    return torch.arange(start, start + s.width)


def group_importance(
    gm: torch.fx.GraphModule, group: PruneGroup, criterion: str,
    saliency: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Importance of each channel: a criterion summed over the group's weight slices."""
    scores = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slices:
        if not s.score:
            continue
        target = s.node.args[s.arg].target
        w = fetch_attr(gm, target).detach().double()
        if criterion == "taylor":
            if saliency is None or target not in saliency:
                raise PreconditionError(f"taylor importance has no gradient for {target}")
            w = saliency[target].double()
        span = w.narrow(s.dim, s.offset, group.size * s.width)
        span = span.movedim(s.dim, 0).reshape(group.size, s.width, -1)
        if criterion == "l2":
            scores += span.pow(2).sum(dim=(1, 2)).sqrt()
        else:  # l1, and taylor's |w * g| is already non-negative
            scores += span.abs().sum(dim=(1, 2))
    return scores


def _pseudo_label_loss(out: torch.Tensor) -> torch.Tensor:
    """Loss without labels: the model's own top item (or sign for one logit)."""
    out = out.float()
    if out.dim() >= 1 and out.shape[-1] > 1:
        flat = out.reshape(-1, out.shape[-1])
        return torch.nn.functional.cross_entropy(flat, flat.argmax(-1).detach())
    return torch.nn.functional.binary_cross_entropy_with_logits(out, (out > 0).float().detach())


def taylor_saliency(
    gm: torch.fx.GraphModule, targets: Iterable[str], batches: Sequence[Sequence[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Sum over ``batches`` of |w * dL/dw| for each parameter in ``targets``.

    L is a pseudo-label loss on the first output (cross-entropy against the
    model's own argmax; BCE against its own sign for a single logit), so no
    labels are needed. Gradients are cleared and ``requires_grad`` restored.
    """
    if not batches:
        raise PreconditionError(
            "criterion=taylor needs calibration batches; pass calibration_data=[...] to graphopt.optimize"
        )
    params = {t: fetch_attr(gm, t) for t in dict.fromkeys(targets)}
    flags = {t: p.requires_grad for t, p in params.items()}
    acc = {t: torch.zeros_like(p, dtype=torch.float64) for t, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        for batch in batches:
            with torch.enable_grad():
                out = gm(*batch)
                first = out[0] if isinstance(out, (tuple, list)) else out
                _pseudo_label_loss(first).backward()
            for t, p in params.items():
                if p.grad is not None:
                    acc[t] += (p.detach() * p.grad).double().abs()
                p.grad = None
    finally:
        for t, p in params.items():
            p.grad = None
            p.requires_grad_(flags[t])
    return acc


def select_removals(
    groups: Sequence[PruneGroup], scores: Sequence[torch.Tensor], ratio: float, scope: str
) -> list[list[int]]:
    """Channels to remove per group: the floor(ratio * size) lowest per group
    (``layer``), or the floor(ratio * total) lowest of all groups, each group's
    scores normalized by its mean (``global``). Raises PassOptionError (before
    any change) when a group would lose every channel."""
    if scope == "layer":
        out = [sorted(torch.argsort(s)[: math.floor(ratio * g.size)].tolist()) for g, s in zip(groups, scores)]
    else:
        flat = [(float(s[c] / s.mean()) if float(s.mean()) else 0.0, gi, c)
                for gi, s in enumerate(scores) for c in range(len(s))]
        flat.sort()
        n = math.floor(ratio * len(flat))
        out = [[] for _ in groups]
        for _, gi, c in flat[:n]:
            out[gi].append(c)
        out = [sorted(x) for x in out]
    for g, rm in zip(groups, out):
        if len(rm) >= g.size:
            raise PassOptionError(
                f"ratio={ratio} scope={scope} would remove all {g.size} channels of {g.name}; "
                "lower the ratio or use scope=layer"
            )
    return out


# ------------------------------------------------------------------ rewrite
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
                i for c in rm for i in _slice_index(s, c).tolist()
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
            args = list(sl.args)
            for k in (2, 3):
                if len(args) > k and isinstance(args[k], int):
                    args[k] = args[k] - sum(1 for i in dropped if i < args[k])
            sl.args = tuple(args)
    for (node, arg, dim), dropped in drops.items():
        tensor = fetch_attr(gm, node.args[arg].target).detach()
        keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in dropped], dtype=torch.long)
        _replace_param(gm, node, arg, tensor.index_select(dim, keep).clone())
    return details


def run_ratio_prune(
    program: Any, ctx: Any, groups: list[PruneGroup], declined: list[str], *,
    ratio: float, criterion: str, scope: str, unit: str,
) -> Any:
    """The body shared by prune-heads/-ffn/-linear: score, select, check, apply.

    Everything up to :func:`select_removals` is analysis, so a bad ratio raises
    before the graph changes. Returns a PassResult with per-layer ``details``,
    one note per layer and the FLOPs on the verify inputs before/after."""
    from graphopt.transform.analysis import count_flops
    from graphopt.transform.base import PassResult

    gm = program.gm
    if not groups:
        return PassResult(program, modified=False, declined=declined)
    saliency = None
    if criterion == "taylor":
        targets = [s.node.args[s.arg].target for g in groups for s in g.slices if s.score]
        saliency = taylor_saliency(gm, targets, ctx.calibration_batches())
    scores = [group_importance(gm, g, criterion, saliency) for g in groups]
    removals = select_removals(groups, scores, ratio, scope)
    if not any(removals):
        return PassResult(program, modified=False, declined=declined,
                          notes=[f"ratio={ratio} removes no {unit} from {len(groups)} layers"])
    inputs = ctx.verify_inputs(program)
    flops_before = count_flops(program, inputs)
    details = apply_groups(gm, groups, removals)
    gm.recompile()
    flops_after = count_flops(program, inputs)
    notes = [
        f"{d['layer']}: {unit} {d['of']} -> {d['kept']} (removed {d['removed'][:8]}"
        f"{'...' if len(d['removed']) > 8 else ''}), -{d['params_removed']:,} params, "
        f"-{d['flops_removed_per_row']:,} FLOPs/row"
        for d in details
    ]
    drop = 100.0 * (flops_before - flops_after) / flops_before if flops_before else 0.0
    notes.append(f"FLOPs on the verify inputs {flops_before:,} -> {flops_after:,} (-{drop:.1f}%)")
    removed = sum(len(d["removed"]) for d in details)
    return PassResult(program, modified=True, stats={f"{unit}-removed": removed, "layers": len(details)},
                      declined=declined, details=details, notes=notes)


# ----------------------------------------------------------------- recovery
def recover(
    pruned: Any,
    teacher: Any,
    inputs: Iterable[Sequence[torch.Tensor]],
    steps: int = 50,
    lr: float = 1e-4,
) -> dict[str, float]:
    """Briefly fine-tune ``pruned``'s float weights in place by distillation.

    ``pruned`` and ``teacher`` are Programs (the pruned one and the unpruned
    one); ``inputs`` is an iterable of positional input tuples (cycled for
    ``steps`` Adam steps at learning rate ``lr``). The loss is the MSE between
    the pruned and the teacher outputs (float outputs only). Returns
    ``{"loss_before", "loss_after", "steps"}``, the losses averaged over the
    batches. ``graphopt finetune`` (issue 8) is the CLI front end for this.
    """
    batches = [tuple(b) for b in inputs]
    if not batches:
        raise PreconditionError("recover needs at least one input batch")
    if steps < 0 or lr <= 0:
        raise PassOptionError(f"recover: steps must be >= 0 and lr > 0, got steps={steps} lr={lr}")
    targets = [tuple(teacher(*b)) for b in batches]
    gm = pruned.gm
    params = {n.target: fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    params = {t: p for t, p in params.items() if isinstance(p, torch.nn.Parameter) and p.is_floating_point()}
    flags = {t: p.requires_grad for t, p in params.items()}

    def loss_of(b: tuple, ref: tuple) -> torch.Tensor:
        out = gm(*b)
        out = out if isinstance(out, (tuple, list)) else (out,)
        terms = [torch.nn.functional.mse_loss(o.float(), r.float()) for o, r in zip(out, ref) if r.is_floating_point()]
        return torch.stack(terms).sum()

    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum(float(loss_of(b, r)) for b, r in zip(batches, targets)) / len(batches))

    before = mean_loss()
    try:
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(list({id(p): p for p in params.values()}.values()), lr=lr)
        for step in range(steps):
            i = step % len(batches)
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_of(batches[i], targets[i]).backward()
            opt.step()
    finally:
        for t, p in params.items():
            p.grad = None
            p.requires_grad_(flags[t])
    after = mean_loss()
    log.info("recover: distillation loss %.4g -> %.4g in %d steps", before, after, steps)
    return {"loss_before": before, "loss_after": after, "steps": float(steps)}
