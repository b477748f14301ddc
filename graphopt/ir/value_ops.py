"""Which aten ops hand on their first argument's values, and which alias it.

One place for the op sets and tests that the runtime contract (id ranges,
position bounds) and the passes (remove-noop, fuse-qkv, buffer-state tracking)
all need: a copy or a full slice keeps every element where it was, a view or
reshape keeps the values but moves them, a cast keeps integers' values, and an
op whose schema marks its first argument as aliased returns (a view of) it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphopt.ir.fx import op_name, tensor_meta

__all__ = ["COPIES", "SAME_VALUES", "CASTS", "is_full_slice", "aliases_first_arg"]

#: same values at the same positions
COPIES = frozenset({"clone", "contiguous", "alias", "detach", "lift_fresh_copy"})
#: same values, positions may move (views, reshapes, broadcasts)
SAME_VALUES = COPIES | {"view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "expand",
                        "expand_as", "permute", "transpose", "t"}
#: dtype conversions: value-preserving when both sides are integer tensors
CASTS = frozenset({"_to_copy", "to", "_to_dim_order_copy", "convert_element_type", "type_as"})

_MAX_END = 2**62  # x[:, 0:] is recorded as slice(x, 1, 0, 9223372036854775807)


def is_full_slice(node: Any) -> bool:
    """``slice(x, dim, start, end, step)`` that keeps every element of ``x`` where it was
    (``x[:, :]``, ``x[:, 0:n]`` with ``n = x.size(1)``); a step other than 1 never does."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or op_name(node) != "slice":
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    src, _, start, end, step = args[:5]
    start, end, step = (node.kwargs.get(k, v) for k, v in (("start", start), ("end", end), ("step", step)))
    if not isinstance(src, torch.fx.Node) or start not in (None, 0) or step not in (None, 1):
        return False
    if end is None or (isinstance(end, int) and end >= _MAX_END):
        return True
    a, b = tensor_meta(src), tensor_meta(node)
    return a is not None and b is not None and a.dim() == b.dim() \
        and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def aliases_first_arg(node: Any, *, writes: bool = True) -> bool:
    """The op's output aliases its first argument (a view: slice, transpose, view...; with
    ``writes``, also an in-place op such as ``add_``, whose output is the written input)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or not node.args:
        return False
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    first = target._schema.arguments[0] if target._schema.arguments else None
    return first is not None and first.alias_info is not None and (writes or not first.alias_info.is_write)
