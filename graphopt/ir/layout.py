"""Views that hold only for one kernel's output layout, made layout-independent.

torch.export turns ``x.reshape(...)`` (and ``.contiguous()``) into a plain
``view`` when the traced strides allow it. Some kernels pick their output
layout by implementation: on CPU, SDPA's flash kernel returns ``[b, h, s, d]``
stored as ``[b, s, h, d]``, so HF's ``attn.transpose(1, 2).reshape(b, s, -1)``
is captured as ``transpose -> view`` with no copy. Any later re-trace that
computes SDPA another way (the ONNX exporter's decomposition, a trace with
grad enabled, a pass that rewrites the attention) gets contiguous
``[b, h, s, d]`` and the view fails: ``Cannot view a tensor with shape
[b, s, 4, 16] and strides (...) as a tensor with shape (b, s, 64)``.

:func:`guard_layout_views` finds every view that is valid only because of
such a layout -- replaying its chain of view ops from the storage's producer
as if that producer returned a contiguous tensor, the view fails -- and puts
``clone(memory_format=contiguous_format)`` in front of it, which is what the
``reshape`` meant. Views valid for contiguous producers are left alone, so
ordinary graphs are unchanged.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode

__all__ = ["layout_dependent_views", "guard_layout_views"]

log = logging.getLogger(__name__)

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default)


def _is_view_op(node: torch.fx.Node) -> bool:
    """An aten op whose (first) result aliases its first argument without writing it."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    if not returns or returns[0].alias_info is None or returns[0].alias_info.is_write:
        return False
    args = target._schema.arguments
    return bool(args) and args[0].alias_info is not None and not args[0].alias_info.is_write


def _chain(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """The node producing ``node``'s storage and the view ops (and getitems of them) in between."""
    chain: list[torch.fx.Node] = []
    cur = node
    while isinstance(cur, torch.fx.Node):
        if cur.op == "call_function" and cur.target is operator.getitem and isinstance(cur.args[0], torch.fx.Node) \
                and _is_view_op(cur.args[0]):  # split/unbind/chunk outputs are views
            chain.append(cur)
            cur = cur.args[0]
        elif _is_view_op(cur):
            chain.append(cur)
            cur = cur.args[0]
        else:
            break
    return cur, chain


def _value(arg: Any, env: dict[torch.fx.Node, Any]) -> Any:
    return torch.fx.node.map_arg(arg, lambda n: env[n] if n in env else n.meta.get("val"))


def _holds_for_contiguous(view: torch.fx.Node, fake_mode: Any) -> bool:
    """Whether ``view`` is valid when its storage's producer returns a contiguous tensor."""
    base, chain = _chain(view.args[0])
    val = base.meta.get("val")
    if not isinstance(val, torch.Tensor) or not chain and val.is_contiguous():
        return True
    env: dict[torch.fx.Node, Any] = {}
    with fake_mode:
        env[base] = torch.empty(val.shape, dtype=val.dtype, device=val.device)
        try:
            for node in reversed(chain):
                env[node] = node.target(*_value(node.args, env), **_value(node.kwargs, env))
            view.target(*_value(view.args, env), **_value(view.kwargs, env))
        except (RuntimeError, ValueError):
            return False
        except Exception:  # an op the replay cannot run: keep the graph as captured
            log.debug("layout check skipped %s", view.name, exc_info=True)
            return True
    return True


def layout_dependent_views(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The ``view`` nodes valid only because some producer returned a non-contiguous layout."""
    views = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _VIEWS
             and isinstance(n.args[0], torch.fx.Node)]
    if not views:
        return []
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta])
    if fake_mode is None:
        return []
    return [v for v in views if not _holds_for_contiguous(v, fake_mode)]


def guard_layout_views(gm: torch.fx.GraphModule) -> int:
    """Put a contiguous ``clone`` before each layout-dependent view; returns how many.

    Views are checked in graph order after the clones before them are in, so
    ``view(view(transpose(sdpa)))`` gets one clone, before the first view.
    """
    views = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _VIEWS
             and isinstance(n.args[0], torch.fx.Node)]
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta])
    if not views or fake_mode is None:
        return 0
    guarded = []
    for view in views:
        if not _holds_for_contiguous(view, fake_mode):
            _guard(gm, view)
            guarded.append(view.name)
    if guarded:
        gm.graph.lint()
        gm.recompile()
        log.info("made %d layout-dependent views copy first: %s", len(guarded), ", ".join(guarded))
    return len(guarded)


def _guard(gm: torch.fx.GraphModule, view: torch.fx.Node) -> None:
    """Insert ``clone(src, memory_format=contiguous_format)`` between ``view`` and its input."""
    src = view.args[0]
    assert isinstance(src, torch.fx.Node)
    with gm.graph.inserting_before(view):
        clone = gm.graph.call_function(aten.clone.default, (src,), {"memory_format": torch.contiguous_format})
    clone.meta.update({k: v for k, v in src.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    val = src.meta.get("val")
    fake_mode = detect_fake_mode([val]) if isinstance(val, torch.Tensor) else None
    if fake_mode is not None:
        with fake_mode:
            clone.meta["val"] = val.clone(memory_format=torch.contiguous_format)
    view.replace_input_with(src, clone)
