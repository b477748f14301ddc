"""Op classes for mixed precision: which aten ops compute in bf16/fp16 and which stay fp32.

Shared by ``cast`` (and by anything that mixes int8 with bf16): one table of

- the matrix ops (GEMMs, attention, convolutions) that pay in low precision:
  ``LOW_PRECISION_OPS``; oneDNN and Inductor accumulate them in fp32 and round
  only the output;
- the op families kept in fp32 (``FP32_FAMILIES``: norms, softmax, reductions,
  and accumulating scatters whose bf16 sums lose digits);
- the view-like ops a weight may pass through before its reader;
- the scoring head (``score_nodes``): the last matrix op feeding each output.
"""

from __future__ import annotations

import torch
import torch.fx

from graphopt.ir.fx import is_op

__all__ = [
    "LOW_PRECISION_OPS",
    "FP32_FAMILIES",
    "ACCUMULATING_OPS",
    "VIEW_OPS",
    "family_ops",
    "score_nodes",
    "tail_nodes",
    "weight_readers",
]

aten = torch.ops.aten

#: what torch.autocast("cpu") runs in lower precision, in the ops a captured Program holds
LOW_PRECISION_OPS = (
    aten.linear, aten.matmul, aten.mm, aten.bmm, aten.addmm, aten.addbmm, aten.baddbmm, aten._addmm_activation,
    aten.scaled_dot_product_attention, aten.convolution, aten._convolution, aten.conv1d, aten.conv2d,
    aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
)

#: ops that add many values into one: a bf16 running sum keeps 8 bits, and Inductor has no
#: bf16 CPU kernel for the scatters (AOTInductor's fallback for bf16 ``index_add`` fails at
#: run time: "Mismatch between ints consumed and num_ints")
ACCUMULATING_OPS = (
    "index_add", "index_put", "_unsafe_index_put", "scatter_add", "scatter_reduce", "index_reduce",
    "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only", "cumsum", "cumprod",
)

#: keep-list entries naming op families; any other entry names an aten op (``gelu``)
FP32_FAMILIES: dict[str, tuple[str, ...]] = {
    "layer_norm": ("layer_norm", "native_layer_norm"),
    "rms_norm": ("rms_norm", "_fused_rms_norm"),
    "group_norm": ("group_norm", "native_group_norm"),
    "batch_norm": ("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit"),
    "softmax": ("softmax", "_softmax"),
    "log_softmax": ("log_softmax", "_log_softmax"),
    "reductions": ("sum", "mean", "prod", "var", "var_mean", "std", "norm", "linalg_vector_norm", "logsumexp",
                   "nll_loss", "nll_loss_forward", "mse_loss", "binary_cross_entropy_with_logits",
                   "cross_entropy_loss", *ACCUMULATING_OPS),
}

#: ops that only re-index a tensor (a weight read through them still feeds one reader)
VIEW_OPS = (
    aten.view, aten.reshape, aten._unsafe_view, aten.t, aten.transpose, aten.permute, aten.expand,
    aten.slice, aten.select, aten.unsqueeze, aten.squeeze, aten.clone, aten.alias, aten.detach,
)

_SCORE_OPS = (aten.linear, aten.matmul, aten.mm, aten.bmm, aten.addmm, aten._addmm_activation)
_SCORE_THROUGH = (aten.view, aten.reshape, aten._unsafe_view, aten.select, aten.slice, aten.squeeze,
                  aten.unsqueeze, aten.clone, aten.add, aten.sub, aten.mul, aten.div)


def family_ops(entries: tuple[str, ...] | list[str]) -> list[object]:
    """The aten op packets named by keep-list entries (families or op names)."""
    return [getattr(aten, op) for e in entries for op in FP32_FAMILIES.get(e, (e,)) if hasattr(aten, op)]


def _is_float(val: object) -> bool:
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def score_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The last linear/matmul feeding each output, and the views/bias ops after it."""
    out = next(n for n in graph.nodes if n.op == "output")
    found: set[torch.fx.Node] = set()
    stack = list(out.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in found or node.op != "call_function":
            continue
        if is_op(node, *_SCORE_OPS):
            found.add(node)
        elif is_op(node, *_SCORE_THROUGH):
            found.add(node)
            stack.extend(a for a in node.all_input_nodes if _is_float(a.meta.get("val")))
    return found


def _rows(node: torch.fx.Node) -> object | None:
    """Rows a matrix op computes: the product of its activation's leading dims (SDPA: queries)."""
    if is_op(node, aten.addmm, aten._addmm_activation, aten.baddbmm, aten.addbmm):
        act = node.args[1]
    else:
        act = node.args[0]
    val = act.meta.get("val") if isinstance(act, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    rows: object = 1
    for d in val.shape[:-1]:
        rows = rows * d
    return rows


def _symbols(expr: object) -> frozenset[str]:
    node = getattr(expr, "node", None)
    return frozenset(str(s) for s in node.expr.free_symbols) if node is not None else frozenset()


def tail_nodes(graph: torch.fx.Graph, ops: tuple[object, ...], factor: int = 8) -> set[torch.fx.Node]:
    """Matrix ops that run on a sliver of the rows another does: rows whose symbols are
    a strict subset of another's (``(batch, 1, d)`` beside ``(batch, seq, d)``: the
    positions prune-positions kept), or, all static, ``factor`` times fewer rows."""
    found = [(n, _rows(n)) for n in graph.nodes if n.op == "call_function" and is_op(n, *ops)]
    found = [(n, r, _symbols(r)) for n, r in found if r is not None]
    widest = max((int(r) for _, r, sym in found if not sym), default=0)
    tail = set()
    for n, r, mine in found:
        if mine and any(mine < other for _, _, other in found):
            tail.add(n)
        elif not mine and not any(sym for _, _, sym in found) and int(r) * factor <= widest:
            tail.add(n)
    return tail


def weight_readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that compute with ``node``'s value, looking through view-like ops."""
    readers: list[torch.fx.Node] = []
    stack = [node]
    while stack:
        value = stack.pop()
        for user in value.users:
            if is_op(user, *VIEW_OPS) and user.args and user.args[0] is value:
                stack.append(user)
            elif user not in readers:
                readers.append(user)
    return readers
