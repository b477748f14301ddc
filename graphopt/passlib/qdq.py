"""The quantize/dequantize (QDQ) representation shared by the precision passes.

Quantization decisions live in the IR in the PT2E reference form, which every
backend lowers to its own integer kernels:

- weights: an int8 ``get_attr`` buffer + ``quantized_decomposed.dequantize_per_channel``
  (symmetric: zero points 0, values in [-127, 127]; quant range [-128, 127] as
  the x86 Inductor quantizer writes it);
- static activations: ``quantize_per_tensor`` -> ``dequantize_per_tensor`` with
  constant scale/zero point (uint8 by default);
- dynamic activations: ``choose_qparams.tensor`` -> ``quantize_per_tensor.tensor``
  -> ``dequantize_per_tensor.tensor``.

Measured with torch 2.13 / onnxruntime 1.32: the form re-exports with
torch.export; Inductor (freezing on) lowers it to ``onednn.qlinear_pointwise``;
the ONNX exporter writes QuantizeLinear/DequantizeLinear that ONNX Runtime runs
as ``MatMulIntegerToFloat``. Two gaps need the ONNX lowerer's help, provided
by ``graphopt.runtimes.onnx_export``: the exporter has no translation for
``choose_qparams.tensor`` and breaks on tensor zero points
(``qdq_translations``), and it writes rank-2 linears as ``Gemm``, which ORT
keeps in float (its QDQ rules only make MatMul integer), as it does for
``MatMul+Add`` unless its ``MatMulAddFusion`` is disabled
(``ORT_DISABLED_OPTIMIZERS``). ``torch.fake_quantize_*`` is never used: it
has no fake kernel and cannot be re-exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
import torch.fx

from graphopt.hardware import has_int8_dot
from graphopt.ir.fx import add_tensor_attr, fetch_attr, matches_skip, module_path
from graphopt.ir.shapes import infer_val

__all__ = [
    "QD",
    "QDQ_OPS",
    "WEIGHT_QMIN",
    "WEIGHT_QMAX",
    "quantize_weight",
    "REDUCE_RANGE_CHOICES",
    "weight_bits",
    "activation_qparams",
    "is_qdq",
    "QuantLinear",
    "find_linears",
    "insert_weight_dequant",
    "insert_activation_qdq",
]

QD = torch.ops.quantized_decomposed
QDQ_OPS = (
    QD.quantize_per_tensor.default,
    QD.dequantize_per_tensor.default,
    QD.quantize_per_tensor.tensor,
    QD.dequantize_per_tensor.tensor,
    QD.dequantize_per_channel.default,
    QD.choose_qparams.tensor,
)
WEIGHT_QMIN, WEIGHT_QMAX = -128, 127


def is_qdq(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in QDQ_OPS


def quantize_weight(
    w: torch.Tensor, *, per_channel: bool = True, symmetric: bool = True, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 ``(q, scale, zero_point)`` of a 2-D weight, per output row or per tensor.

    Symmetric: scale = max|w| / 127, zero point 0. Asymmetric: the row range
    mapped onto [-128, 127]. ``bits=7`` halves both ranges (|q| <= 64, see
    :func:`weight_bits`); the values stay int8 with the same quant range in the
    IR. ``scale``/``zero_point`` have one entry per row (``per_channel``) or
    one in all.
    """
    if bits not in (7, 8):
        raise ValueError(f"weight bits must be 7 or 8, got {bits}")
    qmin, qmax = (WEIGHT_QMIN, WEIGHT_QMAX) if bits == 8 else (-64, 63)
    w = w.detach().float()
    dims = 1 if per_channel else (0, 1)
    if symmetric:
        amax = w.abs().amax(dim=dims) if per_channel else w.abs().amax().reshape(1)
        scale = (amax / float(qmax)).clamp_min(1e-12)
        zp = torch.zeros_like(scale, dtype=torch.int64)
    else:
        lo = (w.amin(dim=dims) if per_channel else w.amin().reshape(1)).clamp_max(0.0)
        hi = (w.amax(dim=dims) if per_channel else w.amax().reshape(1)).clamp_min(0.0)
        scale = ((hi - lo) / float(qmax - qmin)).clamp_min(1e-12)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int64)
    s = scale[:, None] if per_channel else scale
    z = zp[:, None] if per_channel else zp
    q = (torch.round(w / s) + z).clamp(qmin, qmax).to(torch.int8)
    return q, scale, zp


#: ``reduce_range`` option values of the int8 passes
REDUCE_RANGE_CHOICES = ("auto", "true", "false")


def weight_bits(reduce_range: str) -> tuple[int, str | None]:
    """Weight bits for a ``reduce_range`` option value, and a note when ``auto`` chose 7.

    ``auto`` picks 7 bits when this CPU has no VNNI/AMX int8 dot product: its
    int8 GEMMs add u8 x s8 product pairs into a saturating int16, which 8-bit
    weights overflow (see :mod:`graphopt.hardware`).
    """
    if reduce_range == "true":
        return 7, None
    if reduce_range == "false":
        return 8, None
    if has_int8_dot():
        return 8, None
    return 7, ("reduce_range=auto: this CPU has no VNNI/AMX int8 dot product (u8 x s8 pairs saturate int16), "
               "so weights use 7 bits")


def activation_qparams(lo: float, hi: float, dtype: torch.dtype = torch.uint8) -> tuple[float, int, int, int]:
    """``(scale, zero_point, qmin, qmax)`` for the range [lo, hi] (zero always inside).

    uint8: asymmetric over [0, 255]; int8: symmetric over [-127, 127], zero point 0.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype == torch.uint8:
        scale = max((hi - lo) / 255.0, 1e-8)
        zp = int(min(255, max(0, round(-lo / scale))))
        return scale, zp, 0, 255
    if dtype == torch.int8:
        scale = max(max(-lo, hi) / 127.0, 1e-8)
        return scale, 0, -128, 127
    raise ValueError(f"activation dtype must be uint8 or int8, got {dtype}")


@dataclass
class QuantLinear:
    """An ``aten.linear`` with a constant 2-D fp32 weight: a quantization candidate."""

    node: torch.fx.Node
    act: torch.fx.Node
    weight: str
    path: str

    @property
    def label(self) -> str:
        return self.path or self.node.name


def find_linears(gm: torch.fx.GraphModule, skip: Sequence[str] = ()) -> tuple[list[QuantLinear], list[str]]:
    """Linears a precision pass may quantize, and ``"where: why"`` for those it may not.

    ``skip`` holds fnmatch patterns matched against the owning module path
    and the node name (``skip=*.output.dense,linear_12``).
    """
    found: list[QuantLinear] = []
    declined: list[str] = []
    aten = torch.ops.aten
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (aten.matmul.default, aten.mm.default, aten.bmm.default):
            declined.append(f"{node.name}: {node.target.overloadpacket.__name__} of computed operands stays float")
            continue
        if node.target is not aten.linear.default:
            continue
        path = module_path(node)
        where = f"{node.name} ({path})" if path else node.name
        x, w = node.args[0], node.args[1]
        if matches_skip(node, skip):
            declined.append(f"{where}: matched skip")
            continue
        if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
            declined.append(f"{where}: weight is computed, not a constant")
            continue
        value = fetch_attr(gm, w.target)
        if value.dim() != 2 or value.dtype != torch.float32:
            declined.append(f"{where}: weight is {value.dtype} rank {value.dim()}; quantize fp32 weights (before cast)")
            continue
        xval = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not isinstance(x, torch.fx.Node) or (xval is not None and xval.dtype != torch.float32):
            declined.append(f"{where}: input is not fp32")
            continue
        found.append(QuantLinear(node, x, w.target, path))
    return found, declined


def insert_weight_dequant(
    gm: torch.fx.GraphModule,
    layer: QuantLinear,
    q: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    per_channel: bool = True,
) -> torch.fx.Node:
    """Replace ``layer``'s weight input by ``dequantize_per_channel(int8 weight)``
    (``dequantize_per_tensor`` when not ``per_channel``)."""
    base = layer.weight.replace(".", "_")
    node = layer.node
    q_node = add_tensor_attr(gm, base + "_int8", q, before=node)
    if not per_channel:
        with gm.graph.inserting_before(node):
            dq = gm.graph.call_function(
                QD.dequantize_per_tensor.default,
                (q_node, float(scale), int(zp), WEIGHT_QMIN, WEIGHT_QMAX, torch.int8),
            )
    else:
        s_node = add_tensor_attr(gm, base + "_scale", scale.float(), before=node)
        z_node = add_tensor_attr(gm, base + "_zero_point", zp.to(torch.int64), before=node)
        with gm.graph.inserting_before(node):
            dq = gm.graph.call_function(
                QD.dequantize_per_channel.default,
                (q_node, s_node, z_node, 0, WEIGHT_QMIN, WEIGHT_QMAX, torch.int8),
            )
    infer_val(dq)
    old = node.args[1]
    node.replace_input_with(old, dq)
    if not old.users:
        gm.graph.erase_node(old)
    return dq


def insert_activation_qdq(
    gm: torch.fx.GraphModule,
    act: torch.fx.Node,
    users: Sequence[torch.fx.Node],
    qparams: tuple[float, int, int, int] | None,
    dtype: torch.dtype = torch.uint8,
) -> torch.fx.Node:
    """Feed ``users`` with ``dequantize(quantize(act))``: static when ``qparams``
    = (scale, zero_point, qmin, qmax) is given, dynamic (``choose_qparams``) when None."""
    import operator

    graph = gm.graph
    with graph.inserting_after(act):
        if qparams is None:
            qmin, qmax = (0, 255) if dtype == torch.uint8 else (-128, 127)
            choose = graph.call_function(
                QD.choose_qparams.tensor, (act, qmin, qmax, float(torch.finfo(torch.float32).eps), dtype)
            )
            infer_val(choose)
            with graph.inserting_after(choose):
                scale = graph.call_function(operator.getitem, (choose, 0))
            infer_val(scale)
            with graph.inserting_after(scale):
                zp = graph.call_function(operator.getitem, (choose, 1))
            infer_val(zp)
            args: tuple[Any, ...] = (scale, zp, qmin, qmax, dtype)
            q_op, dq_op, after = QD.quantize_per_tensor.tensor, QD.dequantize_per_tensor.tensor, zp
        else:
            args = (*qparams[:4], dtype)
            q_op, dq_op, after = QD.quantize_per_tensor.default, QD.dequantize_per_tensor.default, act
    with graph.inserting_after(after):
        q = graph.call_function(q_op, (act, *args))
    infer_val(q)
    with graph.inserting_after(q):
        dq = graph.call_function(dq_op, (q, *args))
    infer_val(dq)
    for user in users:
        user.replace_input_with(act, dq)
    return dq
