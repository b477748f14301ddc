"""fuse-attention: decomposed softmax attention becomes scaled_dot_product_attention."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from graphopt.passes._patterns import copy_meta, same_shape, scalar

from graphopt.ir.fx import is_op, tensor_meta
from graphopt.transform.base import Option, PassResult, register_pass
from graphopt.transform.rewrite import Match, RewritePass, Rule

__all__ = ["FuseAttention", "AttentionFusion"]

aten = torch.ops.aten

_MATMULS = (aten.matmul.default, aten.bmm.default)
_SOFTMAXES = (aten.softmax.int, aten._softmax.default)
#: |value| above which masked_fill(value) equals adding value (any finite score is absorbed)
_ABSORBING = 1e30
#: finite_mask_fill: the largest fill accepted. masked_fill sets a masked score TO v, the additive
#: mask gives s + v; softmax weighs either by exp(. - rowmax), rowmax >= -max|s| (a row keeps an
#: unmasked key), and that weight is exactly 0 once the exponent is below -104 (fp32's smallest
#: subnormal is exp(-103.3); fp16/bf16 underflow sooner). With v <= -1e4 both are 0 for scores
#: |s| < ~4.9e3, far above trained models' logits; -1e4 is also BERT's classic fill and fits in
#: fp16. Fills such as -1 or 0 change every partly masked row (errors of 0.6 and 1.06 seen).
_MIN_FINITE_FILL = -1e4


@dataclass
class _Match:
    query: torch.fx.Node
    key_t: torch.fx.Node
    value: torch.fx.Node
    out: torch.fx.Node  # the probs @ V matmul
    scale: float = 1.0
    mask: torch.fx.Node | None = None
    fill: float | None = None  # masked_fill value: mask is boolean and becomes additive
    extra_masks: list[torch.fx.Node] = field(default_factory=list)  # more additive terms (T5: bias + mask)


class _Decline(Exception):
    pass


def _single_user(node: torch.fx.Node, what: str) -> None:
    if len(node.users) != 1:
        raise _Decline(f"{what} ({node.name}) is read outside the attention block")


def _dim_is_last(node: torch.fx.Node, dim: object) -> bool:
    t = tensor_meta(node)
    return t is not None and isinstance(dim, int) and dim in (-1, t.dim() - 1)


def _scalar_operand(node: torch.fx.Node) -> tuple[torch.fx.Node, float] | None:
    """``x * c`` / ``c * x`` -> (x, c); ``x / c`` -> (x, 1/c)."""
    if len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if is_op(node, aten.mul.Tensor, aten.mul.Scalar):
        if isinstance(a, torch.fx.Node) and scalar(b) is not None:
            return a, scalar(b)  # type: ignore[return-value]
        if isinstance(b, torch.fx.Node) and scalar(a) is not None:
            return b, scalar(a)  # type: ignore[return-value]
    if is_op(node, aten.div.Tensor, aten.div.Scalar) and isinstance(a, torch.fx.Node) and scalar(b):
        return a, 1.0 / scalar(b)  # type: ignore[operator]
    return None


class _Matcher:
    def __init__(self, finite_mask_fill: bool):
        self.finite_mask_fill = finite_mask_fill

    def match(self, softmax: torch.fx.Node) -> _Match:
        probs = self._softmax_probs(softmax)
        m = _Match(query=softmax, key_t=softmax, value=softmax, out=softmax)
        # downstream: softmax -> [dropout/clone] -> matmul(probs, V)
        cur = softmax
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            if self._is_passthrough(user):
                cur = user
                continue
            break
        _single_user(cur, "attention probabilities")
        out = next(iter(cur.users))
        if not (is_op(out, *_MATMULS) and out.args[0] is cur):
            raise _Decline(f"softmax output feeds {out.name}, not a probs @ V matmul")
        m.out, m.value = out, out.args[1]  # type: ignore[assignment]
        # upstream: matmul(q, k^T) [* scale] [+ mask | masked_fill] -> softmax
        scores = self._strip_mask(probs, m)
        unscaled = self._strip_scale(scores, m)
        if is_op(unscaled, aten.baddbmm.default) and unscaled is not scores:
            raise _Decline(f"{scores.name} scales baddbmm's result: the scale would also apply to its bias "
                           "(SDPA scales q @ k^T only)")
        scores = unscaled
        if is_op(scores, aten.baddbmm.default):
            if m.mask is not None:
                raise _Decline("baddbmm adds a second mask")
            if scores.kwargs.get("beta", 1) != 1 or scores.kwargs.get("alpha", 1) != 1:
                raise _Decline("baddbmm with beta/alpha != 1")
            m.mask = scores.args[0]  # type: ignore[assignment]
        elif not is_op(scores, *_MATMULS):
            raise _Decline(f"scores come from {scores.name}, not a q @ k^T matmul")
        _single_user(scores, "attention scores")
        q, kt = scores.args[-2], scores.args[-1]
        pre = _scalar_operand(q) if isinstance(q, torch.fx.Node) and q.op == "call_function" else None
        if pre is not None and len(q.users) == 1:  # type: ignore[union-attr]
            q, c = pre
            m.scale *= c
        if not m.scale > 0:  # ONNX's SDPA multiplies q and k by sqrt(scale): NaN for a negative one
            raise _Decline(f"scale {m.scale:g} is not positive (SDPA lowerings take sqrt(scale))")
        m.query, m.key_t = q, kt  # type: ignore[assignment]
        self._check_shapes(m)
        return m

    @staticmethod
    def _softmax_probs(softmax: torch.fx.Node) -> torch.fx.Node:
        x = softmax.args[0]
        if not isinstance(x, torch.fx.Node) or not _dim_is_last(x, softmax.args[1]):
            raise _Decline("softmax is not over the last dim")
        if is_op(softmax, aten._softmax.default) and softmax.args[2]:
            raise _Decline("softmax upcasts half to float")
        if is_op(softmax, aten.softmax.int) and (len(softmax.args) > 2 and softmax.args[2] is not None):
            raise _Decline("softmax casts to another dtype")
        _single_user(x, "pre-softmax scores")
        return x

    @staticmethod
    def _is_passthrough(node: torch.fx.Node) -> bool:
        if is_op(node, aten.clone.default, aten.alias.default):
            return node.kwargs.get("memory_format") in (None, torch.preserve_format)
        if is_op(node, aten.dropout.default):
            return not node.args[2]
        return False

    def _strip_mask(self, x: torch.fx.Node, m: _Match) -> torch.fx.Node:
        if self._is_add(x):
            masks = []
            while self._is_add(x) and not self._looks_like_scores(x):  # ((s + bias) + mask): T5
                a, b = x.args[0], x.args[1]
                if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
                    raise _Decline(f"{x.name} adds a scalar, not a mask")
                scores, mask = (a, b) if self._reaches_scores(a) else (b, a)
                if not self._reaches_scores(scores):
                    raise _Decline(f"neither operand of {x.name} is a q @ k^T product")
                if self._reaches_scores(mask):
                    raise _Decline(f"both operands of {x.name} are q @ k^T products")
                if not same_shape(x, scores):
                    raise _Decline(f"mask {mask.name} broadcasts the scores to a bigger shape")
                _single_user(scores, "raw attention scores")
                masks.append(mask)
                x = scores
            m.mask, m.extra_masks = masks[-1], masks[-2::-1]  # innermost first: bias, then mask
            return x
        if is_op(x, aten.masked_fill.Scalar):
            scores, mask, fill = x.args
            value = scalar(fill)
            if self.finite_mask_fill and not (value is not None and value <= _MIN_FINITE_FILL):
                raise _Decline(f"masked_fill value {fill} is above -1e4: setting a score to it is not adding "
                               "it (masked keys keep weight in the softmax)")
            if not self.finite_mask_fill and not (value is not None and value <= -_ABSORBING):
                raise _Decline(
                    f"masked_fill value {fill} is not -inf or <= -1e30; with it, rows whose keys are all "
                    "masked differ from SDPA (set finite_mask_fill=true to accept fills <= -1e4)"
                )
            if not same_shape(x, scores):
                raise _Decline(f"mask {mask.name} broadcasts the scores to a bigger shape")
            m.mask, m.fill = mask, value
            _single_user(scores, "raw attention scores")
            return scores  # type: ignore[return-value]
        return x

    @staticmethod
    def _is_add(node: torch.fx.Node) -> bool:
        return is_op(node, aten.add.Tensor) and node.kwargs.get("alpha", 1) == 1

    def _reaches_scores(self, node: torch.fx.Node, depth: int = 4) -> bool:
        """``node`` is a q @ k^T product or a chain of adds with one on one side."""
        if self._looks_like_scores(node):
            return True
        if depth == 0 or not self._is_add(node):
            return False
        return any(isinstance(a, torch.fx.Node) and self._reaches_scores(a, depth - 1) for a in node.args[:2])

    @staticmethod
    def _looks_like_scores(node: torch.fx.Node) -> bool:
        for _ in range(2):
            if is_op(node, *_MATMULS, aten.baddbmm.default):
                return True
            stripped = _scalar_operand(node) if node.op == "call_function" else None
            if stripped is None:
                return False
            node = stripped[0]
        return False

    @staticmethod
    def _strip_scale(x: torch.fx.Node, m: _Match) -> torch.fx.Node:
        stripped = _scalar_operand(x) if x.op == "call_function" else None
        if stripped is None:
            return x
        inner, c = stripped
        if not c:
            raise _Decline("scale is 0")
        _single_user(inner, "unscaled attention scores")
        m.scale *= c
        return inner

    @staticmethod
    def _check_shapes(m: _Match) -> None:
        q, kt, v = (tensor_meta(n) for n in (m.query, m.key_t, m.value))
        if q is None or kt is None or v is None:
            raise _Decline("q/k/v have no shape metadata")
        if not (q.dim() == kt.dim() == v.dim() >= 3):
            raise _Decline(f"q/k/v ranks {q.dim()}/{kt.dim()}/{v.dim()} differ or are < 3 (broadcast matmul)")
        if not (same_shape_prefix(q, kt) and same_shape_prefix(q, v)):
            raise _Decline("q/k/v batch dims differ (broadcasting matmul)")
        if not (q.dtype == kt.dtype == v.dtype) or not q.is_floating_point():
            raise _Decline(f"q/k/v dtypes {q.dtype}/{kt.dtype}/{v.dtype} differ")
        for node in ([m.mask] if m.mask is not None else []) + m.extra_masks:
            mask = tensor_meta(node)
            if mask is None:
                raise _Decline("mask has no shape metadata")
            if m.fill is None and mask.dtype != q.dtype:
                raise _Decline(f"additive mask dtype {mask.dtype} differs from q dtype {q.dtype}")
        mask = tensor_meta(m.mask) if m.mask is not None else None
        if m.fill is not None and mask is not None and mask.dtype != torch.bool:
            raise _Decline("masked_fill mask is not boolean")


def same_shape_prefix(a: torch.Tensor, b: torch.Tensor) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return all(statically_known_true(x == y) for x, y in zip(a.shape[:-2], b.shape[:-2]))


@dataclass(eq=False)
class _Candidate(Match):
    block: _Match | None  # the matched block, or None with the structural check that failed
    reason: str | None = None


class AttentionFusion(Rule[_Candidate]):
    """A decomposed softmax attention block becomes one ``scaled_dot_product_attention``."""

    name = "attention-blocks"

    def __init__(self, finite_mask_fill: bool):
        self.matcher = _Matcher(finite_mask_fill)

    def match(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Candidate | None:
        if not is_op(node, *_SOFTMAXES):
            return None
        try:
            return _Candidate(node, self.matcher.match(node))
        except _Decline as e:  # the structural matcher checks as it walks the block
            return _Candidate(node, None, str(e))

    def check(self, gm: torch.fx.GraphModule, match: _Candidate) -> str | None:
        return match.reason

    def rewrite(self, gm: torch.fx.GraphModule, match: _Candidate) -> dict[torch.fx.Node, torch.fx.Node]:
        m = match.block
        assert m is not None
        graph = gm.graph
        with graph.inserting_before(m.out):
            key = _untranspose(graph, m.key_t)
            mask = m.mask
            if m.fill is not None and mask is not None:
                dtype = tensor_meta(m.query).dtype  # type: ignore[union-attr]
                zeros = graph.call_function(aten.zeros_like.default, (mask,), {"dtype": dtype})
                mask = graph.call_function(aten.masked_fill.Scalar, (zeros, mask, m.fill))
            for extra in m.extra_masks:  # one additive mask: bias + mask, in the order they were added
                mask = graph.call_function(aten.add.Tensor, (mask, extra))
            q, v = m.query, m.value
            three_d = tensor_meta(q).dim() == 3  # type: ignore[union-attr]
            if three_d:  # bmm attention (nn.MultiheadAttention): a 4-D SDPA with one head, as exporters require
                q, key, v = (graph.call_function(aten.unsqueeze.default, (t, 1)) for t in (q, key, v))
                if mask is not None and _mask_rank(m) == 3:
                    mask = graph.call_function(aten.unsqueeze.default, (mask, 1))
            out = sdpa = graph.call_function(
                aten.scaled_dot_product_attention.default, (q, key, v, mask), {"scale": m.scale},
            )
            if three_d:
                out = graph.call_function(aten.squeeze.dim, (sdpa, 1))
                copy_meta(out, m.out)
        copy_meta(sdpa, m.out)
        return {m.out: out}  # the block it replaces (and an unused k^T) dies with it


@register_pass
class FuseAttention(RewritePass):
    """Rewrite decomposed attention into ``aten.scaled_dot_product_attention``.

    Matches: ``matmul(q, k^T)`` (or ``bmm``/``baddbmm(mask, q, k^T)``), an
    optional scalar scale (``* c`` or ``/ c`` on the scores, or ``* c`` on q;
    T5's ``* 1.0`` gives ``scale=1.0``), optional masks (``+ mask`` with float
    masks, several summed into one: T5's ``+ position_bias + mask``; or
    ``masked_fill(mask, -inf)``; with finite_mask_fill, fills <= -1e4),
    ``softmax(dim=-1)``, optional eval dropout/clone, and
    ``matmul(probs, v)``, where every intermediate has one user. This is what
    ``attn_implementation="eager"`` transformers, ``nn.MultiheadAttention``
    with ``need_weights=True`` and hand-written SASRec attention produce.
    Produces: ``scaled_dot_product_attention(q, k, v, attn_mask=mask,
    scale=c)``; k is recovered from k^T (or transposed back). Each softmax
    block not fused is declined with the check that failed: among them a
    scale <= 0 (ONNX's SDPA takes its square root) and a scale on a
    ``baddbmm``'s result (it would scale the bias too). 3-D (bmm) attention
    becomes a 4-D SDPA on ``unsqueeze(1)``'d q/k/v/mask, squeezed back, which
    every backend (ONNX export included) accepts. Requires and
    preserves shapes. Exact up to the SDPA kernel's rounding (tested at 1e-5).
    Note: rows whose keys are all masked give NaN before and 0 after (SDPA's
    safe softmax). Run after remove-dropout.
    Before/after: ``softmax(q @ k.transpose(-2, -1) * 0.125 + m, -1) @ v`` ->
    ``scaled_dot_product_attention(q, k, v, m, scale=0.125)``.
    """

    name = "fuse-attention"
    options = (
        Option("finite_mask_fill", bool, False,
               "also fuse masked_fill with finite values <= -1e4 such as -1e9 (such a fill and an additive "
               "mask give the same softmax except in rows with every key masked); fills above -1e4 never fuse"),
    )
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})
    tolerance = 1e-5
    backend_notes = "eager CPU/CUDA use flash/efficient SDPA kernels; ONNX export emits the SDPA subgraph"

    def rules(self) -> list[AttentionFusion]:
        return [AttentionFusion(self.finite_mask_fill)]

    def notes(self, result: PassResult) -> list[str]:
        fused = result.stats.get("attention-blocks", 0)
        sdpa = sum(1 for n in result.program.graph.nodes if is_op(n, aten.scaled_dot_product_attention))
        notes = [f"{fused} of {fused + len(result.declined)} attention blocks fused"]
        if sdpa > fused:
            notes.append(f"{sdpa - fused} blocks were already scaled_dot_product_attention")
        return notes


def _mask_rank(m: _Match) -> int:
    """Rank of the summed additive mask (broadcasting: the largest of its terms)."""
    return max(tensor_meta(n).dim() for n in [m.mask, *m.extra_masks])  # type: ignore[union-attr,misc]


def _untranspose(graph: torch.fx.Graph, key_t: torch.fx.Node) -> torch.fx.Node:
    """k from k^T: the input of a last-two-dims transpose, or a new transpose."""
    rank = tensor_meta(key_t).dim()  # type: ignore[union-attr]
    if is_op(key_t, aten.transpose.int) and len(key_t.users) == 1:
        dims = {d % rank for d in key_t.args[1:3]}  # type: ignore[operator]
        if dims == {rank - 2, rank - 1}:
            return key_t.args[0]  # type: ignore[return-value]
    return graph.call_function(aten.transpose.int, (key_t, -2, -1))
