"""fold-batchnorm: fold eval-mode batch norm into the preceding linear/conv."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
from graphopt.passes._patterns import constant_tensor

from graphopt.ir.fx import add_tensor_attr, is_op, tensor_meta
from graphopt.transform.base import register_pass
from graphopt.transform.rewrite import Match, RewritePass, Rule
from graphopt.transform.state import mutated_attrs

__all__ = ["FoldBatchNorm", "BatchNormFold"]

aten = torch.ops.aten

_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
_BATCH_NORMS = (aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default)


def _bn_parts(bn: torch.fx.Node) -> tuple[list[torch.fx.Node | None], float, str | None]:
    """(weight, bias, mean, var) nodes, eps, and a reason when this is not eval BN."""
    if is_op(bn, aten.batch_norm.default):
        x, w, b, mean, var, training, _, eps = bn.args[:8]
        if training:
            return [], 0.0, "batch_norm with training=True uses batch statistics"
        return [w, b, mean, var], float(eps), None
    x, w, b, mean, var, _, eps = bn.args[:7]
    return [w, b, mean, var], float(eps), None


def _bn_output_users_ok(bn: torch.fx.Node) -> bool:
    """Only the normalised output (item 0) of a tuple-returning BN is read."""
    if is_op(bn, aten.batch_norm.default):
        return True
    return all(u.target is operator.getitem and u.args[1] == 0 for u in bn.users)


@dataclass(eq=False)
class _BatchNorm(Match):
    producer: object  # what feeds the batch norm: a linear/conv node when the rule applies


class BatchNormFold(Rule[_BatchNorm]):
    """An eval batch norm after a linear/conv becomes that op's scaled weights and bias."""

    name = "bn-fold"  # counted as linear+bn / conv+bn

    def match(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> _BatchNorm | None:
        if not is_op(node, *_BATCH_NORMS):
            return None
        producer = node.args[0]
        linear = isinstance(producer, torch.fx.Node) and is_op(producer, aten.linear.default)
        return _BatchNorm(node, producer, kind="linear+bn" if linear else "conv+bn")

    def check(self, gm: torch.fx.GraphModule, match: _BatchNorm) -> str | None:
        bn, producer = match.node, match.producer
        if not isinstance(producer, torch.fx.Node) or not is_op(producer, aten.linear.default, *_CONVS):
            name = producer.name if isinstance(producer, torch.fx.Node) else repr(producer)
            return f"input {name} is not a linear or conv"
        parts, _, reason = _bn_parts(bn)
        if reason:
            return reason
        if len(producer.users) != 1:
            return f"{producer.name} has other users besides the batch norm"
        if not _bn_output_users_ok(bn):
            return "the batch norm's saved statistics are read (training graph?)"
        if is_op(producer, aten.convolution.default) and producer.args[6]:
            return "transposed convolution keeps output channels in weight dim 1"
        if is_op(producer, aten.linear.default):
            out = tensor_meta(producer)
            if out is None or out.dim() != 2:
                return "batch norm normalises dim 1, but this linear's features are dim -1 of a >2-D output"
        weight = producer.args[1]
        bias = producer.args[2] if len(producer.args) > 2 else None
        if constant_tensor(gm, weight) is None or (bias is not None and constant_tensor(gm, bias) is None):
            return f"{producer.name}'s weight/bias is not a constant"
        if any(p is not None and constant_tensor(gm, p) is None for p in parts):
            return "batch norm weight/bias/statistics are not constants"
        if parts[2] is None or parts[3] is None:
            return "batch norm has no running statistics"
        mutated = mutated_attrs(gm.graph)
        for attr in (weight, bias, *parts):
            if isinstance(attr, torch.fx.Node) and str(attr.target) in mutated:
                return f"{attr.target} is updated in place by forward (folded weights would go stale)"
        return None

    def rewrite(self, gm: torch.fx.GraphModule, match: _BatchNorm) -> dict[torch.fx.Node, torch.fx.Node]:
        bn, producer = match.node, match.producer
        assert isinstance(producer, torch.fx.Node)
        parts, eps, _ = _bn_parts(bn)
        gamma, beta, mean, var = (constant_tensor(gm, p) if p is not None else None for p in parts)
        weight = constant_tensor(gm, producer.args[1])
        assert weight is not None and mean is not None and var is not None
        bias_node = producer.args[2] if len(producer.args) > 2 else None
        bias = constant_tensor(gm, bias_node) if bias_node is not None else None
        acc = torch.float64  # fold in double, store in the weight's dtype
        scale = torch.rsqrt(var.to(acc) + eps)
        if gamma is not None:
            scale = scale * gamma.to(acc)
        new_w = weight.to(acc) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        b = bias.to(acc) if bias is not None else torch.zeros_like(mean, dtype=acc)
        new_b = (b - mean.to(acc)) * scale + (beta.to(acc) if beta is not None else 0.0)
        base = str(producer.args[1].target).rsplit(".", 1)[0]  # type: ignore[union-attr]
        w_node = add_tensor_attr(gm, f"{base}.bn_folded_weight", new_w.to(weight.dtype), before=producer)
        b_node = add_tensor_attr(gm, f"{base}.bn_folded_bias", new_b.to(weight.dtype), before=producer)
        args = list(producer.args)
        args[1] = w_node
        if len(args) > 2:
            args[2] = b_node
        else:
            args.append(b_node)
        producer.args = tuple(args)
        if is_op(bn, aten.batch_norm.default):
            return {bn: producer}
        return {user: producer for user in bn.users}  # getitem(bn, 0)


@register_pass
class FoldBatchNorm(RewritePass):
    """Fold eval-mode batch norm into the weights of the linear/conv before it.

    Matches: ``aten.linear`` (2-D output, so the BN channel dim 1 is the
    feature dim) or ``aten.conv{1,2,3}d``/``convolution`` (not transposed)
    whose only user is ``_native_batch_norm_legit_no_training`` (or
    ``batch_norm`` with training=False), with constant weights and statistics
    that forward does not update in place.
    Produces: the linear/conv with ``W' = W * g/sqrt(var+eps)`` (per output
    channel) and ``b' = (b - mean) * g/sqrt(var+eps) + beta``; the BN and its
    ``getitem`` are removed. Requires and preserves shapes. Exact up to
    float rounding (tested at 1e-5).
    Before/after: ``getitem(bn(linear(x, W, b), g, beta, m, v), 0)`` -> ``linear(x, W', b')``.
    """

    name = "fold-batchnorm"
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})
    tolerance = 1e-5

    def rules(self) -> list[BatchNormFold]:
        return [BatchNormFold()]
