"""remove-noop: ops that return their input unchanged."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx
from graphopt.passes._patterns import reads_attr, same_shape

from graphopt.ir.fx import tensor_meta
from graphopt.ir.value_ops import is_full_slice
from graphopt.transform.base import register_pass
from graphopt.transform.rewrite import Match, RewritePass, Rule
from graphopt.transform.state import mutated_attrs

__all__ = ["RemoveNoop", "NoopRule"]

aten = torch.ops.aten


def _same_meta(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    ta, tb = tensor_meta(a), tensor_meta(b)
    return ta is not None and tb is not None and ta.dtype == tb.dtype and ta.device == tb.device and same_shape(a, b)


def _identity_reshape(node: torch.fx.Node) -> bool:  # view/reshape/expand to the same shape
    return isinstance(node.args[0], torch.fx.Node) and _same_meta(node, node.args[0])


def _identity_to_copy(node: torch.fx.Node) -> bool:  # _to_copy to the same dtype/device/layout
    extra = set(node.kwargs) - {"dtype", "device", "layout"}
    return not extra and isinstance(node.args[0], torch.fx.Node) and _same_meta(node, node.args[0])


def _identity_clone(node: torch.fx.Node) -> bool:  # clone in a functional graph, default format
    return node.kwargs.get("memory_format") in (None, torch.preserve_format) and isinstance(node.args[0], torch.fx.Node)


def _zero_add(node: torch.fx.Node) -> bool:
    """``x + 0`` / ``x - 0`` on integers; on floats only ``x + (-0.0)`` and ``x - 0.0``:
    ``-0.0 + 0.0`` is ``+0.0`` (1/x changes sign), while adding -0.0 returns every x unchanged."""
    if not (len(node.args) == 2 and node.args[1] == 0 and isinstance(node.args[0], torch.fx.Node)
            and _same_meta(node, node.args[0])):
        return False
    t = tensor_meta(node)
    if t is None or not (t.is_floating_point() or t.is_complex()):
        return True
    alpha = node.kwargs.get("alpha", 1)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha == 0:
        return False  # x + 0 * alpha with alpha = 0 or a symbol: leave it
    added = math.copysign(1.0, float(node.args[1])) * math.copysign(1.0, float(alpha))  # type: ignore[arg-type]
    if node.target == aten.sub.Tensor:
        added = -added
    return added < 0  # the value added is -0.0


def _one_mul(node: torch.fx.Node) -> bool:  # x * 1
    return len(node.args) == 2 and node.args[1] == 1 and isinstance(node.args[0], torch.fx.Node) and _same_meta(node, node.args[0])


class NoopRule(Rule[Match]):
    """One row of the table below: ``targets`` whose node returns ``args[0]`` when ``is_noop``."""

    def __init__(self, name: str, targets: tuple[object, ...], is_noop: Callable[[torch.fx.Node], bool]):
        self.name = name
        self.targets, self.is_noop = targets, is_noop

    def match(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
        if node.op == "call_function" and node.target in self.targets and self.is_noop(node):
            return Match(node)
        return None

    def check(self, gm: torch.fx.GraphModule, match: Match) -> str | None:
        # a buffer that forward updates in place: clone/cast/+0 is the value BEFORE the update;
        # without it the output would alias the buffer and show the updated value
        attr = reads_attr(match.node.args[0], mutated_attrs(gm.graph))
        return f"its input {attr} is updated in place later (the copy is its earlier value)" if attr else None

    def rewrite(self, gm: torch.fx.GraphModule, match: Match) -> dict[torch.fx.Node, torch.fx.Node]:
        return {match.node: match.node.args[0]}  # type: ignore[dict-item]


RULES = (
    NoopRule("identity-view", (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                               aten.expand.default), _identity_reshape),
    NoopRule("same-dtype-cast", (aten._to_copy.default,), _identity_to_copy),
    NoopRule("clone", (aten.clone.default,), _identity_clone),
    NoopRule("alias", (aten.alias.default,), lambda n: isinstance(n.args[0], torch.fx.Node)),
    NoopRule("full-slice", (aten.slice.Tensor,), is_full_slice),
    NoopRule("add-zero", (aten.add.Tensor, aten.sub.Tensor), _zero_add),
    NoopRule("mul-one", (aten.mul.Tensor, aten.div.Tensor), _one_mul),
)


@register_pass
class RemoveNoop(RewritePass):
    """Remove ops that return their input unchanged (views, clones, casts).

    Matches (one rule each): view/reshape/expand to the same shape, ``_to_copy``
    to the same dtype/device, ``clone`` (graphs are functional), ``alias``,
    a full slice ``x[0:MAX:1]``, ``x + 0`` (on floats only the exact
    identities ``x + (-0.0)`` and ``x - 0``: ``-0.0 + 0`` is ``+0.0``),
    ``x * 1``. An op whose input is (a view of) a buffer that forward updates
    in place is kept (declined): it holds the value before the update. Shapes are compared
    symbolically, so a view from ``[s0, 16]`` to ``[s0, 16]`` matches and one
    to ``[s0*16]`` does not. One walk: ``view(view(x))`` with both views
    identities goes in that walk (each is checked against its own input).
    Requires shapes; preserves them. Exact.
    Before/after: ``y = view(x, [b, s, 32])`` with x ``[b, s, 32]`` -> ``x``.
    """

    name = "remove-noop"
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})

    def rules(self) -> tuple[NoopRule, ...]:
        return RULES
