"""remove-dropout: drop dropout, an identity at inference."""

from __future__ import annotations

import torch

from graphopt.ir.fx import is_op, module_type
from graphopt.transform.base import Pass, PassResult, register_pass

__all__ = ["RemoveDropout"]

aten = torch.ops.aten

_DROPOUT_OPS = (aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout)
_DROPOUT_MODULES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")


def _is_dropout_module(node: torch.fx.Node) -> bool:
    owner = module_type(node).rsplit(".", 1)[-1]
    return owner in _DROPOUT_MODULES


@register_pass
class RemoveDropout(Pass):
    """Remove dropout (an identity in eval mode) so later fusions see through it.

    Matches: ``aten.dropout``/``feature_dropout``/``alpha_dropout`` with
    ``train=False``, and the ``aten.clone`` that torch.export leaves where an
    eval-mode ``nn.Dropout`` module stood. ``native_dropout`` and dropout with
    ``train=True`` are declined (they are random, not identities).
    Produces: uses of the dropout redirected to its input. Preserves shapes.
    Exact. Before/after: ``y = clone(linear(x))  # Dropout`` -> ``y = linear(x)``.
    """

    name = "remove-dropout"
    preserves = frozenset({"shapes"})

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        removed: dict[str, int] = {}
        declined: list[str] = []
        for node in list(program.gm.graph.nodes):
            if is_op(node, *_DROPOUT_OPS):
                train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
                if train:
                    declined.append(f"{node.name}: dropout with train=True is random, not an identity")
                    continue
                kind = str(node.target.overloadpacket.__name__)
            elif is_op(node, aten.native_dropout):
                declined.append(f"{node.name}: native_dropout returns a mask too; capture in eval mode")
                continue
            elif is_op(node, aten.clone) and _is_dropout_module(node) and not node.kwargs.get("memory_format"):
                kind = "eval-dropout-clone"
            else:
                continue
            node.replace_all_uses_with(node.args[0])
            program.gm.graph.erase_node(node)
            removed[kind] = removed.get(kind, 0) + 1
        return PassResult(program, modified=bool(removed), stats=removed, declined=declined)
