"""Static TensorRT-compatibility check of an ONNX graph, without TensorRT.

Encodes the ONNX-TensorRT parser's support matrix for TensorRT 10.x
(``onnx-tensorrt/docs/operators.md``: supported ops, their data types and
restrictions) and reports what would make ``OnnxParser.parse`` or the engine
build fail:

* ``unsupported-op``: an op the parser does not import (SequenceEmpty,
  ConcatFromSequence, MatMulInteger...), or one from a non-standard domain
  (``com.microsoft`` fusions are ONNX Runtime only);
* ``unsupported-type``: an op fed a data type outside its list, e.g. an int64
  MatMul, or DOUBLE anywhere (cast down with clamping: a warning);
* ``topk``: TopK with a non-constant K, K above 3840, or ``sorted=0``;
* ``qdq``: QuantizeLinear/DequantizeLinear with a non-zero zero point
  (TensorRT is symmetric-only), or uint8 quantized data;
* ``constant-input``: inputs TensorRT needs at build time (``axes`` of
  Reduce*/Squeeze/Unsqueeze, CumSum ``axis``, OneHot ``depth``) that are
  computed at run time;
* ``int64-input``: int64 network inputs (TensorRT 10 accepts them; older
  parsers cast to int32 with clamping: info).

``check_onnx(model_or_path) -> list[Finding]``; errors mean the build would
fail, warnings mean it builds but differs from ONNX semantics or is slow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Finding", "check_onnx", "TRT_VERSION", "SUPPORTED", "UNSUPPORTED", "MAX_TOPK"]

#: the support matrix encoded below
TRT_VERSION = "10.x (onnx-tensorrt operators.md, opset 9-24)"
MAX_TOPK = 3840

_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_FIB = _FI + ("BOOL",)
_B = ("BOOL",)

#: op -> data types the parser accepts for its main input
SUPPORTED: dict[str, tuple[str, ...]] = {
    **{op: _FI for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual",
        "IsNaN", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Pow", "Range", "Relu",
        "Scatter", "ScatterElements", "ScatterND", "Shrink", "Sign", "SpaceToDepth", "Sub", "Sum",
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare", "TopK", "Mean",
    )},
    **{op: _FIB for op in (
        "Concat", "Constant", "ConstantOfShape", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements",
        "GatherND", "Identity", "If", "Loop", "OneHot", "Reshape", "ReverseSequence", "Shape", "Size",
        "Slice", "Split", "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where",
    )},
    **{op: _F for op in (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Attention", "AveragePool", "BatchNormalization",
        "Ceil", "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum", "Elu",
        "Erf", "Exp", "Floor", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool",
        "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax", "ImageScaler",
        "InstanceNormalization", "IsInf", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "LRN",
        "LSTM", "LpNormalization", "LpPool", "MatMul", "MaxPool", "MeanVarianceNormalization",
        "ParametricSoftplus", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform",
        "RandomUniformLike", "Reciprocal", "Resize", "RMSNormalization", "RNN", "RotaryEmbedding", "Round",
        "ScaledTanh", "Scan", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt",
        "Tan", "Tanh", "ThresholdedRelu", "Upsample",
    )},
    **{op: ("FP32", "FP16") for op in (
        "BlackmanWindow", "DeformConv", "GridSample", "HammingWindow", "HannWindow", "Mish",
        "NonMaxSuppression", "NonZero", "RoiAlign", "STFT",
    )},
    **{op: _B for op in ("And", "Not", "Or", "Xor")},
    "Cast": _FI + ("UINT8", "BOOL"),
    "CastLike": _FI + ("UINT8", "BOOL"),
    "Gelu": _FI + ("INT8",),
    "DequantizeLinear": ("INT8", "FP8", "FP4", "INT4"),
    "TensorScatter": _F + ("INT32",),
}

#: ops the parser rejects outright
UNSUPPORTED = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})

#: op -> input index that must be a build-time constant
_CONSTANT_INPUTS: dict[str, tuple[int, str]] = {
    **{op: (1, "axes") for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze",
    )},
    "CumSum": (1, "axis"),
    "OneHot": (1, "depth"),
    "TopK": (1, "K"),
}

_ONNX_TYPES = {
    1: "FP32", 2: "UINT8", 3: "INT8", 5: "INT16", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
    12: "UINT32", 13: "UINT64", 16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 23: "FP4",
}
_STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class Finding:
    """One compatibility problem: severity ``error`` | ``warning`` | ``info``."""

    severity: str
    rule: str
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        where = f"{self.node} ({self.op})" if self.node else self.op or "graph"
        return f"{self.severity}: {self.rule}: {where}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def _load(model_or_path: Any) -> Any:
    from graphopt.errors import ArtifactError, BackendUnavailableError, first_line

    try:
        import onnx
    except ImportError as e:
        raise BackendUnavailableError(f"the TensorRT check reads ONNX with the onnx package: pip install "
                                      f"'graphopt[onnx]' ({first_line(e, with_type=False, limit=80)})") from None
    if isinstance(model_or_path, (str, Path)):
        try:
            return onnx.load(str(model_or_path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError (truncated, not ONNX), onnx's own errors
            if isinstance(e, OSError):
                raise
            raise ArtifactError(f"{model_or_path} is not a readable ONNX model ({first_line(e, with_type=True, limit=120)}); "
                                "re-export it, or point at the model it came from") from None
    return model_or_path


def _all_nodes(graph: Any) -> list[Any]:
    """Nodes of ``graph`` and of every subgraph (Loop/If/Scan bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.HasField("g"):
                nodes.extend(_all_nodes(attr.g))
            for sub in attr.graphs:
                nodes.extend(_all_nodes(sub))
    return nodes


def _constants(model: Any) -> dict[str, Any]:
    """Initializers and Constant-node outputs (name -> TensorProto)."""
    consts = {t.name: t for t in model.graph.initializer}
    for node in _all_nodes(model.graph):
        if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    return consts


def _types(model: Any) -> dict[str, str]:
    """Value name -> data type name, after ONNX shape inference."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is best effort; fall back to declared types
        inferred = model
    types: dict[str, str] = {}
    for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = _ONNX_TYPES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))
    for t in model.graph.initializer:
        types[t.name] = _ONNX_TYPES.get(t.data_type, str(t.data_type))
    return types


def _values(tensor: Any) -> Any:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def check_onnx(model_or_path: Any) -> list[Finding]:
    """Statically check an ONNX model (``ModelProto`` or path) for TensorRT 10."""
    model = _load(model_or_path)
    consts = _constants(model)
    types = _types(model)
    findings: list[Finding] = []

    def add(severity: str, rule: str, node: Any, message: str) -> None:
        findings.append(Finding(severity, rule, node.name if node is not None else "",
                                node.op_type if node is not None else "", message))

    for vi in model.graph.input:
        t = types.get(vi.name)
        if t == "INT64":
            findings.append(Finding("info", "int64-input", "", "input",
                                    f"input '{vi.name}' is int64: TensorRT 10 takes it natively; "
                                    "TensorRT < 10 casts it to int32 (values clamped to +-2^31)"))
        elif t in ("DOUBLE", "INT16", "UINT32", "UINT64"):
            findings.append(Finding("error", "unsupported-type", "", "input",
                                    f"input '{vi.name}' is {t}; TensorRT networks take "
                                    "FP32/FP16/BF16/INT32/INT64/INT8/UINT8/BOOL"))
    for t in model.graph.initializer:
        if t.data_type == 11:
            findings.append(Finding("warning", "unsupported-type", t.name, "initializer",
                                    "DOUBLE weights are cast to FP32 with clamping"))

    for node in _all_nodes(model.graph):
        op = node.op_type
        if node.domain not in _STANDARD_DOMAINS:
            add("error", "unsupported-op", node,
                f"op from domain '{node.domain}' (ONNX Runtime contrib op); export without ORT fusions "
                "or provide a TensorRT plugin")
            continue
        if op in UNSUPPORTED:
            add("error", "unsupported-op", node, f"{op} is not supported by the ONNX-TensorRT parser")
            continue
        if op not in SUPPORTED:
            add("error", "unsupported-op", node, f"{op} is not in the ONNX-TensorRT {TRT_VERSION} support list")
            continue
        allowed = SUPPORTED[op]
        data_inputs = [i for i in node.input[:1] if i]
        if op in ("Where",):
            data_inputs = [i for i in node.input[1:2] if i]
        for name in data_inputs:
            t = types.get(name)
            if t is None or op in ("Cast", "CastLike", "QuantizeLinear", "DequantizeLinear", "Shape", "Size"):
                continue
            if t == "DOUBLE":
                add("warning", "unsupported-type", node, f"input '{name}' is DOUBLE: cast to FP32 with clamping")
            elif t not in allowed:
                add("error", "unsupported-type", node,
                    f"input '{name}' is {t}; TensorRT's {op} takes {', '.join(allowed)}")
        if op in _CONSTANT_INPUTS:
            index, what = _CONSTANT_INPUTS[op]
            if len(node.input) > index and node.input[index] and node.input[index] not in consts:
                add("error", "constant-input", node,
                    f"`{what}` ({node.input[index]}) is computed at run time; TensorRT needs it at build time")
        if op == "TopK":
            sorted_attr = next((a.i for a in node.attribute if a.name == "sorted"), 1)
            if sorted_attr != 1:
                add("error", "topk", node, "TopK with sorted=0 is not supported; TensorRT returns sorted values")
            if len(node.input) > 1 and node.input[1] in consts:
                k = int(_values(consts[node.input[1]]).reshape(-1)[0])
                if k > MAX_TOPK:
                    add("error", "topk", node,
                        f"K={k} exceeds TensorRT's TopK limit of {MAX_TOPK}; take top-k in chunks or on host")
        if op in ("QuantizeLinear", "DequantizeLinear"):
            zp_name = node.input[2] if len(node.input) > 2 else ""
            if zp_name and zp_name in consts:
                zp = _values(consts[zp_name])
                if zp.size and (zp != 0).any():
                    add("error", "qdq", node,
                        "non-zero zero point (asymmetric quantization); TensorRT supports symmetric int8 only: "
                        "quantize with zero_point=0")
                if consts[zp_name].data_type == 2:
                    add("error", "qdq", node, "uint8 quantization; TensorRT quantizes to int8 (or fp8/int4) only")
            elif zp_name:
                add("error", "qdq", node, "zero point is computed at run time; TensorRT needs a constant 0")
            if op == "DequantizeLinear" and types.get(node.input[0]) == "UINT8":
                add("error", "qdq", node, "uint8 quantized data; TensorRT dequantizes int8/fp8/int4 only")
        if op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            add("error", "unsupported-output", node, "only the first output of LayerNormalization is supported")
        if op == "ScatterND":
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if reduction != "none":
                add("error", "unsupported-attr", node, f"ScatterND reduction='{reduction}' is not supported")
    return findings
