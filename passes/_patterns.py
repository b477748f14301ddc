"""Small matching helpers shared by the fusion passes (not a pass itself).

Everything here reads the graph; nothing mutates it except ``copy_meta``, which
only fills metadata on nodes a pass has just created.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphopt.ir.fx import fetch_attr, tensor_meta

__all__ = [
    "constant_tensor",
    "scalar",
    "same_shape",
    "is_pure",
    "copy_meta",
    "reads_attr",
]

aten = torch.ops.aten


def constant_tensor(gm: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, else None."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = fetch_attr(gm, str(node.target))
        if isinstance(value, torch.Tensor):
            return value
    return None


def scalar(value: Any) -> float | None:
    """A Python number (not bool), else None."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return float(value)  # type: ignore[arg-type]
    return None


def same_shape(a: Any, b: Any) -> bool:
    """Both nodes' fake tensors have provably equal shapes (symbolic-aware)."""
    ta, tb = tensor_meta(a), tensor_meta(b)
    if ta is None or tb is None or ta.dim() != tb.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(ta.shape, tb.shape))


def is_pure(node: torch.fx.Node) -> bool:
    """A call_function with no side effects and no randomness (safe to dedupe or fold)."""
    if node.op != "call_function" or node.is_impure():
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            return False
        name = target._schema.name
        if name.startswith("aten::_assert") or name in ("aten::empty", "aten::empty_like", "aten::empty_strided"):
            return False
        return True
    # operator.getitem and python arithmetic on SymInts are pure
    return getattr(target, "__module__", "") in ("_operator", "operator")


def copy_meta(new: torch.fx.Node, old: torch.fx.Node) -> None:
    """Carry module ownership and stack trace to a node that replaces ``old``."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def reads_attr(node: Any, targets: set[str] | frozenset[str]) -> str | None:
    """The target in ``targets`` of the get_attr that ``node`` is, or is a (chain of) view of."""
    from graphopt.transform.state import root_attr

    root = root_attr(node)
    return str(root.target) if root is not None and str(root.target) in targets else None
