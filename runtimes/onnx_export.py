"""Program -> ONNX with the dynamo exporter; shared by onnxruntime and tensorrt.

``torch.onnx.export(program.export(), dynamo=True, external_data=False)``
with the Program's input/output names; the symbolic dims torch.export made
(``s72``, ``s53``) are renamed after the InputSpec labels (``batch``,
``seq``), so every input and output shows the same dynamic axis names.
Weights go to an external data file only above 2 GB (the protobuf limit).

A query row whose boolean attention mask is all False (a user with no
events) gets zeros from torch's attention and a uniform average of the
values from ONNX's (ORT's fused attention too); the export multiplies each
such attention output by ``any(mask, -1)`` (:func:`zero_fully_masked_rows`)
so every runtime scores that row as torch does.

For TensorRT (``export_onnx(..., for_tensorrt=True)``) the uint8 code tables
of ``quantize-embeddings`` are gathered as int32 words
(:func:`uint8_gathers_as_words`): TensorRT has no uint8 Gather.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import LoweringError
from graphopt.ir.fx import is_op, op_name
from graphopt.ir.program import Program

__all__ = ["export_onnx", "zero_fully_masked_rows", "save_onnx", "rename_dims", "op_counts", "qdq_translations", "ORT_DISABLED_OPTIMIZERS",
           "EXTERNAL_DATA_BYTES", "uint8_gathers_as_words"]

log = logging.getLogger(__name__)

#: above this many weight bytes the model is saved with external data
EXTERNAL_DATA_BYTES = 1_900_000_000

_SYM = re.compile(r"\bs\d+\b")


def _symbol_labels(ep: torch.export.ExportedProgram, program: Program) -> dict[str, str]:
    """torch symbol name -> InputSpec label (first label wins)."""
    user_inputs = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    mapping: dict[str, str] = {}
    for spec, ph_name in zip(program.inputs, user_inputs):
        val = placeholders[ph_name].meta.get("val") if ph_name in placeholders else None
        if not isinstance(val, torch.Tensor):
            continue
        for dim, label in spec.dynamic.items():
            if dim < val.dim() and isinstance(val.shape[dim], torch.SymInt):
                mapping.setdefault(str(val.shape[dim]), label)
    return mapping


_LAYOUT_OPS = ("clone", "contiguous", "view", "reshape", "_unsafe_view")


def _rank(node: torch.fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _heads_merged(sdpa: torch.fx.Node) -> torch.fx.Node | None:
    """The node after ``transpose(1, 2)`` and a reshape to (batch, seq, width)
    that merge SDPA's heads (a same-rank view may come first), where that
    chain is SDPA's only use; else None."""
    node, transposed = sdpa, False
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not transposed and op_name(user) == "transpose" and sorted(user.args[1:3]) == [1, 2]:
            transposed = True
        elif op_name(user) in _LAYOUT_OPS and (transposed or _rank(user) == 4):
            pass
        else:
            break
        node = user
    return node if transposed and _rank(node) == 3 else None


def zero_fully_masked_rows(gm: torch.fx.GraphModule) -> int:
    """Zero each attention output row whose boolean ``attn_mask`` row is all
    False, as torch's kernels do (ONNX's softmax over a large negative bias
    gives the values' mean there): the output is multiplied by
    ``any(mask, -1)`` (as ``min(sum(mask, -1), 1)``), one for every other row
    (exact). The product goes after
    the heads are merged (``transpose(1, 2)`` + reshape) where the graph has
    that form, so ORT's attention fusions still see SDPA's whole pattern;
    elsewhere straight after SDPA. Edits ``gm`` in place (an
    ExportedProgram's own module); returns how many outputs it guards."""
    aten = torch.ops.aten
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if not is_op(node, aten.scaled_dot_product_attention):
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        val = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dtype != torch.bool:
            continue
        merged = _heads_merged(node) if val.dim() == 4 and val.shape[1] == 1 else None
        at = merged if merged is not None else node
        dtype = at.meta["val"].dtype
        with graph.inserting_after(at):  # any(mask, -1) as min(sum, 1): ReduceSum converts to every opset
            allowed = graph.call_function(aten.sum.dim_IntList, (mask, [-1], True), {"dtype": dtype})
        allowed.meta["val"] = aten.sum.dim_IntList(val, [-1], True, dtype=dtype)
        with graph.inserting_after(allowed):
            keep = graph.call_function(aten.clamp_max.default, (allowed, 1))  # (batch, 1, queries, 1)
        keep.meta["val"] = aten.clamp_max.default(allowed.meta["val"], 1)
        if merged is not None:
            with graph.inserting_after(keep):
                keep = graph.call_function(aten.squeeze.dim, (keep, 1))  # (batch, queries, 1)
            keep.meta["val"] = aten.squeeze.dim(keep.args[0].meta["val"], 1)
        with graph.inserting_after(keep):
            out = graph.call_function(aten.mul.Tensor, (at, keep))
        out.meta["val"] = aten.mul.Tensor(at.meta["val"], keep.meta["val"])
        at.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def rename_dims(model: Any, mapping: dict[str, str]) -> int:
    """Rename symbolic dim params in inputs, outputs and value_info; returns count."""
    count = 0
    graph = model.graph
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if not vi.type.HasField("tensor_type"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                new = _SYM.sub(lambda m: mapping.get(m.group(0), m.group(0)), d.dim_param)
                if new != d.dim_param:
                    d.dim_param = new
                    count += 1
    return count


def export_onnx(program: Program, *, opset: int | None = None, optimize: bool = True,
                for_tensorrt: bool = False) -> Any:
    """The Program as an ``onnx.ModelProto`` (standard ONNX ops only); with
    ``for_tensorrt`` the form TensorRT parses (:func:`uint8_gathers_as_words`)."""
    try:
        import onnx
        import onnx.defs
    except ImportError as e:
        raise LoweringError(f"ONNX export needs the onnx package: pip install 'graphopt[onnx]' ({e})") from None
    ep = program.export()
    zero_fully_masked_rows(ep.graph_module)
    args = tuple(program.sample_inputs())
    # dynamic int8 (choose_qparams on activations) has no exporter translation of its own
    dynamic_qdq = any(n.target is torch.ops.quantized_decomposed.choose_qparams.tensor
                      for n in program.graph.nodes if n.op == "call_function")
    onnx_program = torch.onnx.export(
        ep,
        args,
        dynamo=True,
        custom_translation_table=qdq_translations() if dynamic_qdq else None,
        external_data=False,
        input_names=program.input_names,
        output_names=program.output_names,
        opset_version=opset,
        optimize=optimize,
        verbose=False,
    )
    model = onnx_program.model_proto
    wrote = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and wrote != opset:  # the exporter falls back to its own opset where it cannot convert
        raise LoweringError(f"opset={opset}: the ONNX exporter cannot write {program.name} at that opset (it "
                            f"wrote {wrote}, and this onnx knows up to {onnx.defs.onnx_opset_version()}); leave "
                            f"opset unset or pick one it converts to, such as {wrote}")
    if [i.name for i in model.graph.input] != program.input_names:
        raise LoweringError(
            f"ONNX export changed the inputs of {program.name}: {[i.name for i in model.graph.input]} "
            f"vs {program.input_names}"
        )
    if len(model.graph.output) != len(program.output_names):
        raise LoweringError(
            f"ONNX export of {program.name} has {len(model.graph.output)} outputs, "
            f"the Program {len(program.output_names)}"
        )
    renamed = rename_dims(model, _symbol_labels(ep, program))
    log.info("exported %s to ONNX (%d nodes, %d dims renamed)", program.name, len(model.graph.node), renamed)
    if for_tensorrt:
        uint8_gathers_as_words(model)
    return model


def save_onnx(model: Any, path: Path, weight_bytes: int = 0) -> list[str]:
    """Write ``model`` to ``path``; external data beside it only above 2 GB.
    Returns the file names written."""
    import onnx

    if weight_bytes > EXTERNAL_DATA_BYTES:
        data = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, location=data, all_tensors_to_one_file=True)
        return [path.name, data]
    onnx.save_model(model, str(path))
    return [path.name]


def op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def uint8_gathers_as_words(model: Any) -> int:
    """Rewrite each ``Gather(uint8 table, ids) -> Cast`` into a Gather TensorRT supports.

    TensorRT takes uint8 only as a network input or output, so the row-wise
    code tables of ``quantize-embeddings`` are stored as int32 words holding
    four codes each (the same bytes, little-endian; rows padded to a multiple
    of 4) and unpacked after the gather with exact integer arithmetic:
    ``b0 = w mod 256`` (ONNX ``Mod``, fmod=0: the sign of the divisor, so the
    bytes of a negative word come out right), ``w = (w - b0) / 256``, and so on
    for the four bytes, then ``Reshape`` to ``ids.shape + [row]`` (``Slice``
    off the padding). Still one gather per lookup; the table stays 1 byte per
    code. Only gathers whose every reader is a ``Cast`` are rewritten (that is
    the dequantize of ``quantize-embeddings``); others are left for the
    checker to report. Returns how many were rewritten.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    nodes, count, consts = [], 0, []

    def const(name: str, value: Any, dtype: Any) -> str:
        consts.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        outs = readers.get(node.output[0], []) if node.output else []
        if (table is None or table.data_type != TensorProto.UINT8 or len(table.dims) != 2
                or not outs or any(r.op_type != "Cast" for r in outs)
                or dict((a.name, helper.get_attribute_value(a)) for a in node.attribute).get("axis", 0) != 0):
            nodes.append(node)
            continue
        codes = numpy_helper.to_array(table)
        rows, width = codes.shape
        words = np.zeros((rows, -(-width // 4) * 4), dtype=np.uint8)
        words[:, :width] = codes
        p = f"{node.name or table.name}_words"
        const(p + "_table", words.view("<i4"), np.int32)
        b, c256 = [], const(p + "_256", 256, np.int32)
        axes = const(p + "_axes", [-1], np.int64)
        new = [helper.make_node("Gather", [p + "_table", node.input[1]], [p + "_w0"], name=p + "_gather", axis=0)]
        for k in range(4):
            new.append(helper.make_node("Mod", [f"{p}_w{k}", c256], [f"{p}_b{k}"], name=f"{p}_mod{k}", fmod=0))
            if k < 3:
                new.append(helper.make_node("Sub", [f"{p}_w{k}", f"{p}_b{k}"], [f"{p}_r{k}"], name=f"{p}_sub{k}"))
                new.append(helper.make_node("Div", [f"{p}_r{k}", c256], [f"{p}_w{k + 1}"], name=f"{p}_div{k}"))
            new.append(helper.make_node("Unsqueeze", [f"{p}_b{k}", axes], [f"{p}_u{k}"], name=f"{p}_unsq{k}"))
            b.append(f"{p}_u{k}")
        new.append(helper.make_node("Concat", b, [p + "_bytes"], name=p + "_concat", axis=-1))
        new.append(helper.make_node("Shape", [node.input[1]], [p + "_ids_shape"], name=p + "_shape"))
        new.append(helper.make_node("Concat", [p + "_ids_shape", const(p + "_width", [words.shape[1]], np.int64)],
                                    [p + "_out_shape"], name=p + "_out_shape", axis=0))
        flat = node.output[0] if width == words.shape[1] else p + "_flat"
        new.append(helper.make_node("Reshape", [p + "_bytes", p + "_out_shape"], [flat], name=p + "_reshape"))
        if flat != node.output[0]:
            new.append(helper.make_node("Slice", [flat, const(p + "_start", [0], np.int64),
                                                  const(p + "_end", [width], np.int64), axes],
                                        [node.output[0]], name=p + "_slice"))
        nodes.extend(new)
        graph.initializer.remove(table)
        for vi in graph.value_info:
            if vi.name == node.output[0]:
                vi.type.tensor_type.elem_type = TensorProto.INT32
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(consts)
        onnx.checker.check_model(model)
        log.info("tensorrt: %d uint8 table gathers now gather int32 words", count)
    return count


#: ONNX Runtime fuses MatMul+Add into Gemm before its QDQ rules run, and keeps
#: a DQ->Gemm in float; sessions of quantized models pass this to
#: ``InferenceSession(..., disabled_optimizers=...)``.
ORT_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


def qdq_translations() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``
    of quantized Programs: dynamic quantization as ``DynamicQuantizeLinear``,
    tensor-valued scales/zero points, and rank-2 quantized linears as MatMul
    (+Add) so ONNX Runtime can run them on integer kernels."""
    from onnxscript import opset18 as op

    float_, double_, uint8_, int8_, int64_ = 1, 11, 2, 3, 7

    def choose_qparams(x: Any, quant_min: int, quant_max: int, eps: float, dtype: int) -> Any:
        _, scale, zp = op.DynamicQuantizeLinear(x)  # uint8, asymmetric, zero in range
        return op.Cast(scale, to=double_), op.Cast(zp, to=int64_)

    def _qtype(dtype: int) -> int:
        return int8_ if int(dtype) == int8_ else uint8_

    def quantize_tensor(x: Any, scale: Any, zp: Any, quant_min: int, quant_max: int, dtype: int) -> Any:
        return op.QuantizeLinear(x, op.Cast(scale, to=float_), op.Cast(zp, to=_qtype(dtype)))

    def dequantize_tensor(
        x: Any, scale: Any, zp: Any, quant_min: int, quant_max: int, dtype: int, out_dtype: int = -1
    ) -> Any:
        return op.DequantizeLinear(x, op.Cast(scale, to=float_), op.Cast(zp, to=_qtype(dtype)))

    def linear(x: Any, weight: Any, bias: Any = None) -> Any:
        producer = weight.producer() if hasattr(weight, "producer") else None
        quantized = producer is not None and producer.op_type == "DequantizeLinear"
        if len(x.shape) == 2 and not quantized:
            return op.Gemm(x, weight, bias, transB=True)
        out = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
        return out if bias is None else op.Add(out, bias)

    return {
        torch.ops.quantized_decomposed.choose_qparams.tensor: choose_qparams,
        torch.ops.quantized_decomposed.quantize_per_tensor.tensor: quantize_tensor,
        torch.ops.quantized_decomposed.dequantize_per_tensor.tensor: dequantize_tensor,
        torch.ops.aten.linear.default: linear,
    }
