"""Small torch.fx helpers shared by passes: attributes, names, module owners.

Passes edit weights through these so that every pass adds constants the same
way and unused weights are really dropped from the GraphModule.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

__all__ = [
    "fetch_attr",
    "target_name",
    "op_name",
    "add_tensor_attr",
    "drop_unused_attrs",
    "matches_skip",
    "skip_note",
    "unmatched_skip",
    "module_path",
    "module_type",
    "where",
    "is_op",
    "tensor_meta",
    "users_of",
]


def target_name(target: Any) -> str:
    """``aten.linear.default`` for an OpOverload, the function name otherwise."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def op_name(node: torch.fx.Node) -> str:
    """The op's short name: ``linear`` for ``aten.linear.default``, the function name otherwise."""
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def is_op(node: torch.fx.Node, *ops: Any) -> bool:
    """True when ``node`` calls one of ``ops`` (OpOverloads or OpOverloadPackets)."""
    if node.op != "call_function":
        return False
    for op in ops:
        if node.target is op:
            return True
        if isinstance(op, torch._ops.OpOverloadPacket) and getattr(node.target, "overloadpacket", None) is op:
            return True
    return False


def _unique_name(gm: torch.nn.Module, base: str) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]", "_", base) or "_graphopt_const"
    if base[0].isdigit():
        base = "_" + base
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_tensor_attr(
    gm: torch.fx.GraphModule, base_name: str, value: torch.Tensor, *, before: torch.fx.Node
) -> torch.fx.Node:
    """Register ``value`` on ``gm`` (a buffer, or a Parameter if float) and
    insert a ``get_attr`` node for it before ``before``, with ``meta["val"]``."""
    name = _unique_name(gm, base_name)
    value = value.detach()
    if value.is_floating_point():
        gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    else:
        gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def drop_unused_attrs(gm: torch.fx.GraphModule) -> int:
    """Delete parameters/buffers no ``get_attr`` node reads; return how many."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        if name in used:
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = fetch_attr(gm, owner_path) if owner_path else gm
        if leaf in owner._parameters:
            del owner._parameters[leaf]
            dropped += 1
        elif leaf in owner._buffers:
            del owner._buffers[leaf]
            dropped += 1
    return dropped


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost nn.Module that produced ``node`` ('' if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path)


def matches_skip(node: torch.fx.Node, patterns: Iterable[str]) -> bool:
    """Whether ``node``'s module path or name matches one of the fnmatch ``patterns`` (the ``skip=`` option of
    the precision passes)."""
    names = [name for name in (module_path(node), node.name) if name]
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns for name in names)


def unmatched_skip(gm: torch.fx.GraphModule, patterns: Iterable[str]) -> list[str]:
    """The ``skip=`` patterns that match no op's module path or name in ``gm`` (:func:`matches_skip`)."""
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    return [p for p in patterns if not any(matches_skip(n, (p,)) for n in ops)]


def skip_note(gm: torch.fx.GraphModule, patterns: Iterable[str], show: int = 5) -> list[str]:
    """One report note naming the ``skip=`` patterns that match nothing (so keep nothing float), with a few
    of the module paths there are; empty when every pattern matches. Users often write ``named_modules()``
    names (``0``, ``encoder.fc``), where graphopt's paths start at the captured root (``model.0``)."""
    missing = unmatched_skip(gm, patterns)
    if not missing:
        return []
    paths = sorted({module_path(n) for n in gm.graph.nodes if n.op == "call_function"} - {""})
    have = ", ".join(paths[:show]) + (", ..." if len(paths) > show else "") if paths else "none"
    roots = {q.split(".")[0] for q in paths}
    root = roots.pop() if len(roots) == 1 else None
    prefixed = [f"{root}.{p}" for p in missing if root and any(fnmatch.fnmatchcase(q, f"{root}.{p}") for q in paths)]
    hint = f" (did you mean {', '.join(prefixed)}?)" if prefixed else ""
    return [f"skip={','.join(missing)} matched no module path or node name, so nothing was kept float for it{hint}; "
            f"write module paths as graphopt names them (here: {have})"]


def module_type(node: torch.fx.Node) -> str:
    """Qualified class name of the innermost owning module ('' if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    _, cls = list(stack.values())[-1]
    return cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))


def where(node: torch.fx.Node) -> str:
    """``module.path (node)`` for report lines, or the node's name when no module owns it."""
    path = module_path(node)
    return f"{path} ({node.name})" if path else node.name


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The fake tensor in ``node.meta["val"]`` when there is one."""
    if isinstance(node, torch.fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def users_of(nodes: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    out: set[torch.fx.Node] = set()
    for n in nodes:
        out.update(n.users)
    return out
