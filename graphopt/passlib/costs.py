"""Per-node cost estimates from shape metadata (example sizes for symbols):
bytes of a tensor value and FLOPs of a node. Used to balance stages (split-stages)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint
except ImportError:  # torch < 2.13 (GPU images ship 2.11): the symbol's example hint, no guards added

    def optimization_hint(a: Any, fallback: int | None = None) -> int:
        if not isinstance(a, torch.SymInt):
            return a
        hint = a.node.shape_env.size_hint(a.node.expr, allow_none=True)
        return fallback if hint is None else hint

__all__ = ["hint_shape", "tensor_bytes", "node_flops"]

aten = torch.ops.aten


def _hint(size: Any) -> int:
    if isinstance(size, torch.SymInt):
        return int(optimization_hint(size, fallback=1))
    return int(size)


def hint_shape(val: torch.Tensor) -> list[int]:
    """Concrete shape of a (fake) tensor, symbols replaced by their example hints."""
    return [_hint(s) for s in val.shape]


def tensor_bytes(val: torch.Tensor) -> int:
    numel = 1
    for s in hint_shape(val):
        numel *= s
    return numel * val.element_size()


def node_flops(node: torch.fx.Node) -> int:
    """FLOPs of one node estimated from its shape metadata (example sizes):
    matmuls and attention count multiply-adds as 2, everything else one per
    output element."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return 0
    out = 1
    for s in hint_shape(val):
        out *= s

    def arg_shape(i: int) -> list[int]:
        arg = node.args[i] if i < len(node.args) else None
        meta = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        return hint_shape(meta) if isinstance(meta, torch.Tensor) else []

    packet = getattr(node.target, "overloadpacket", None)
    if packet in (aten.linear, aten.matmul, aten.mm, aten.bmm):
        k = arg_shape(0)[-1:] or [1]
        return 2 * out * k[0]
    if packet in (aten.addmm, aten.baddbmm):
        k = arg_shape(1)[-1:] or [1]
        return 2 * out * k[0]
    if packet is aten.scaled_dot_product_attention:
        key = arg_shape(1)
        return 4 * out * (key[-2] if len(key) >= 2 else 1)
    if packet is aten.convolution:
        weight = arg_shape(1)
        per_out = 1
        for s in weight[1:]:
            per_out *= s
        return 2 * out * per_out
    return out
