"""int8-mixed-bf16: quantized linears return bf16, carried through what reads them cheaply.

The form ``torch.autocast(cpu, bf16)`` gives a PT2E int8 graph, which
Inductor's x86 int8 lowering matches (``with_dtype_convert`` patterns):

- a quantized linear reads ``_to_copy(dq(x), bf16)`` and ``_to_copy(dq_w, bf16)``
  with a bf16 bias, so oneDNN's ``qlinear_pointwise`` writes bf16;
- its output stays bf16 through view-like ops, relu/gelu (Inductor computes a
  bf16 gelu in fp32 and rounds once) and ``scaled_dot_product_attention``
  (all of q, k, v and a float mask cast to bf16);
- the next quantize op reads the bf16 tensor itself (it computes in fp32);
- linears the accuracy guard keeps out of int8 run as bf16 GEMMs (bf16 weight
  constants), as autocast runs them: on an AMX Xeon a kept fp32 FFN linear of
  bert4rec:base at batch 32 took 3.1 ms of a 12.4 ms forward;
- everything else (layer norms, residual adds, softmax heads) reads
  ``_to_copy(.., float32)``: one cast per tensor.

So attention runs in bf16 and the GEMM outputs move half the bytes, while the
residual stream and normalizations keep fp32, as under autocast.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable

import torch
import torch.fx

from graphopt.ir.fx import add_tensor_attr, fetch_attr, is_op
from graphopt.ir.shapes import infer_val

__all__ = ["carry_bf16"]

aten = torch.ops.aten

#: ops whose output is the input's values rearranged, or a cheap unary of them
_CARRY = (
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.split_with_sizes.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.contiguous.default, aten.clone.default, aten.expand.default, aten.relu.default,
    aten.gelu.default,
)
_SDPA = aten.scaled_dot_product_attention.default
_QUANTIZE = torch.ops.quantized_decomposed.quantize_per_tensor.default


def _cast(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype,
          cache: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node]) -> torch.fx.Node:
    key = (node, dtype)
    if key not in cache:
        with gm.graph.inserting_after(node):
            cache[key] = gm.graph.call_function(aten._to_copy.default, (node,), {"dtype": dtype})
        infer_val(cache[key])
    return cache[key]


def _is_float(node: object, dtype: torch.dtype = torch.float32) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == dtype


def _is_low(node: torch.fx.Node) -> bool:
    """A bf16 tensor, or a tuple of them (split)."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return bool(val) and all(isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 for v in val)
    return _is_float(node, torch.bfloat16)


def _order(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _bf16_constant(gm: torch.fx.GraphModule, attr: torch.fx.Node, before: torch.fx.Node) -> torch.fx.Node:
    value = fetch_attr(gm, str(attr.target)).detach().to(torch.bfloat16)
    return add_tensor_attr(gm, str(attr.target).replace(".", "_") + "_bf16", value, before=before)


def carry_bf16(gm: torch.fx.GraphModule, linears: Iterable[torch.fx.Node],
               kept: Iterable[torch.fx.Node] = ()) -> dict[str, int]:
    """Rewrite the quantized ``linears`` (``linear(dq(x), dq_w, b)``) into the
    int8-mixed-bf16 form, and the ``kept`` float linears (``linear(x, w, b)``,
    constant ``w``) into bf16 GEMMs, as autocast runs them; returns counts
    (``bf16-linear``, ``bf16-float-linear``, ``bf16-sdpa``, ``to-fp32``)."""
    cache: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node] = {}
    counts = {"bf16-linear": 0, "bf16-float-linear": 0, "bf16-sdpa": 0, "to-fp32": 0}
    low: set[torch.fx.Node] = set()
    for lin, key in [(n, "bf16-linear") for n in linears] + [(n, "bf16-float-linear") for n in kept]:
        x, w = lin.args[0], lin.args[1]
        bias = lin.args[2] if len(lin.args) > 2 else None
        lin.replace_input_with(x, _cast(gm, x, torch.bfloat16, cache))
        for operand in (w, bias):
            if not isinstance(operand, torch.fx.Node):
                continue
            if operand.op == "get_attr":  # a constant: stored in bf16, no cast per call
                lin.replace_input_with(operand, _bf16_constant(gm, operand, before=lin))
            else:
                lin.replace_input_with(operand, _cast(gm, operand, torch.bfloat16, cache))
        infer_val(lin)
        low.add(lin)
        counts[key] += 1
    # carry bf16 forward in graph order; attention goes bf16 when a quantized linear feeds it
    order = _order(gm)  # in graph order: an attention's q, k and v are settled before it
    frontier = [(order[n], n.name, n) for n in low]
    heapq.heapify(frontier)
    while frontier:
        node = heapq.heappop(frontier)[2]
        for user in list(node.users):
            if user in low or user.op != "call_function":
                continue
            if is_op(user, *_CARRY) or user.target is operator.getitem:
                infer_val(user)
                if _is_low(user):
                    low.add(user)
                    heapq.heappush(frontier, (order[user], user.name, user))
                continue
            if is_op(user, _SDPA):
                for arg in user.args[:4]:
                    if isinstance(arg, torch.fx.Node) and _is_float(arg):
                        user.replace_input_with(arg, _cast(gm, arg, torch.bfloat16, cache))
                infer_val(user)
                low.add(user)
                heapq.heappush(frontier, (order[user], user.name, user))
                counts["bf16-sdpa"] += 1
    # everything else reads fp32: one cast per bf16 tensor that leaves the bf16 region
    for node in sorted(low, key=_order(gm).__getitem__):
        readers = [u for u in node.users if u not in low and not (u.op == "call_function" and u.target is
                   aten._to_copy.default and u.kwargs.get("dtype") == torch.float32)]
        # quantize_per_tensor reads bf16 itself (as under autocast): Inductor's int8-mixed-bf16
        # patterns expect q(gelu_bf16), so the requantization fuses into the GEMM
        readers = [u for u in readers if u.target not in (operator.getitem, _QUANTIZE)]
        if not readers or not _is_float(node, torch.bfloat16):
            continue
        up = _cast(gm, node, torch.float32, cache)
        counts["to-fp32"] += 1
        for user in readers:
            if user is not up:
                user.replace_input_with(node, up)
    gm.graph.lint()
    gm.recompile()
    return counts
