"""Small matching helpers shared by the fusion passes (not a pass itself).

Everything here reads the graph; nothing mutates it except ``copy_meta`` and
``insert_like`` which only fill metadata on nodes a pass has just created.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphopt.errors import GraphoptError
from graphopt.ir.fx import fetch_attr, module_path, tensor_meta

__all__ = [
    "constant_tensor",
    "scalar",
    "same_shape",
    "static_dims",
    "is_pure",
    "where",
    "copy_meta",
    "infer_val",
    "fill_vals",
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


def static_dims(node: Any) -> list[int | None]:
    """Dims of ``node`` as ints where static, None where symbolic or unknown."""
    t = tensor_meta(node)
    if t is None:
        return []
    out: list[int | None] = []
    for s in t.shape:
        if isinstance(s, int):
            out.append(s)
        else:
            as_int = s.node.maybe_as_int() if isinstance(s, torch.SymInt) else None
            out.append(as_int if isinstance(as_int, int) else None)
    return out


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


def where(node: torch.fx.Node) -> str:
    """``module.path (node)`` for report lines."""
    path = module_path(node)
    return f"{path} ({node.name})" if path else node.name


def copy_meta(new: torch.fx.Node, old: torch.fx.Node) -> None:
    """Carry module ownership and stack trace to a node that replaces ``old``."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def infer_val(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Fill ``node.meta["val"]`` by running its op on the inputs' fake tensors.

    Returns False (and leaves meta alone) when an input has no metadata; passes
    that call this may still not declare ``preserves={"shapes"}`` unless every
    new node got a value.
    """
    fakes = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(fakes)
    if mode is None:
        return False
    missing = False

    def value(arg: torch.fx.Node) -> Any:
        nonlocal missing
        if "val" not in arg.meta:
            missing = True
            return None
        val = arg.meta["val"]
        if isinstance(val, torch.Tensor) and not isinstance(val, torch._subclasses.FakeTensor):
            return mode.from_tensor(val, static_shapes=True)
        return val

    args = torch.fx.node.map_arg(node.args, value)
    kwargs = torch.fx.node.map_arg(node.kwargs, value)
    if missing:
        return False
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)  # type: ignore[operator]
    return True


def fill_vals(gm: torch.fx.GraphModule, existing: set[torch.fx.Node]) -> None:
    """``infer_val`` for every call_function node not in ``existing``, in graph
    order, so a rewriting pass can declare that it preserves shapes."""
    for node in gm.graph.nodes:
        if node not in existing and node.op == "call_function" and not infer_val(gm, node):
            raise GraphoptError(f"{node.name}: could not infer its shape; an input lacks meta['val']")
