"""``onnxruntime``: ONNX export + onnxscript ORT fusions + an ONNX Runtime session.

Lowering: :func:`graphopt.runtimes.onnx_export.export_onnx` (dynamo
exporter, dynamic axes named after the InputSpecs), then
``onnxscript.rewriter.ort_fusions.optimize_for_ort`` (fused Attention,
SkipLayerNormalization, BiasGelu on BERT graphs), then optionally onnxslim.
A fused or slimmed graph that ONNX Runtime cannot load falls back to the
previous one, with the reason in the manifest. QDQ Programs get the
transformer fusions only (``fuse_xformers``: MultiHeadAttention,
SkipLayerNormalization, BiasGelu), not ``optimize_for_ort``'s FusedMatMul
rules, which fold DQ->Transpose->MatMul so that ORT's QDQ transformer can no
longer turn it into integer kernels; the fused graph is kept only if ORT runs
as many integer kernels on it.

Int8 QDQ Programs (``quantized_decomposed`` ops) export as
QuantizeLinear/DequantizeLinear; a ``Gemm`` whose bias is float is split into
``Gemm + Add`` so ORT's QDQ transformer can fuse it into ``QGemm``. The
manifest records which integer kernels the ORT-optimized graph uses
(``backend.qdq``). bf16 Programs are refused: the CPU provider has no bf16
kernels.

Artifact: ``model.onnx`` (+ ``model.optimized.onnx`` with ``save_optimized``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from graphopt.runtimes.onnx_export import export_onnx, op_counts, save_onnx

from graphopt.errors import LoweringError, RunnerError, first_line
from graphopt.ir.program import Program
from graphopt.runtime import Backend, Option, Runner, is_quantized, program_dtypes

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeRunner", "BACKEND", "session_options", "split_qdq_gemm_bias", "INTEGER_OPS"]

log = logging.getLogger(__name__)

#: ORT ops that compute on integer data (what QDQ fusion should produce)
INTEGER_OPS = frozenset(
    {
        "QGemm",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QLinearConv",
        "ConvInteger",
        "QAttention",
        "QEmbedLayerNormalization",
        "QLinearAdd",
        "QLinearMul",
    }
)
_FLOAT_COMPUTE = frozenset({"MatMul", "Gemm", "FusedGemm", "FusedMatMul", "Conv", "FusedConv"})
_LEVELS = ("disable", "basic", "extended", "all")


def _level(ort: Any, name: str) -> Any:
    return {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


def split_qdq_gemm_bias(model: Any) -> int:
    """``Gemm(DQ(a), DQ(b), float_bias)`` -> ``Gemm(DQ(a), DQ(b)) + Add(bias)``.

    ORT fuses DQ->Gemm into QGemm only when the bias is absent or itself
    dequantized int32. Returns the number of Gemms split."""
    from onnx import helper

    producers = {out: n for n in model.graph.node for out in n.output}
    new_nodes = []
    split = 0
    for node in model.graph.node:
        new_nodes.append(node)
        if node.op_type != "Gemm" or len(node.input) != 3 or not node.input[2]:
            continue
        a, b, c = (producers.get(x) for x in node.input)
        if not (a is not None and a.op_type == "DequantizeLinear" and b is not None
                and b.op_type == "DequantizeLinear"):
            continue
        if c is not None and c.op_type == "DequantizeLinear":
            continue
        beta = next((attr.f for attr in node.attribute if attr.name == "beta"), 1.0)
        if beta != 1.0:
            continue
        bias = node.input[2]
        out = node.output[0]
        tmp = f"{out}__qgemm"
        del node.input[2]
        node.output[0] = tmp
        new_nodes.append(helper.make_node("Add", [tmp, bias], [out], name=f"{node.name}_bias_add"))
        split += 1
    if split:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
    return split


def session_options(
    *,
    level: str = "all",
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    spin: bool = True,
    optimized_model_path: str = "",
    log_severity: int = 3,
) -> Any:
    """The one place graphopt configures an ONNX Runtime session (its own
    runners, the lowerer's checks and the peer recipes of the harness):
    graph optimization level, thread pools (0 = ORT's default), whether idle
    intra-op threads spin (``spin=False`` for timing: a spinning pool slows
    whatever runs next), where to write the optimized graph, log severity."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    so.graph_optimization_level = _level(ort, level)
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    if inter_op_threads:
        so.inter_op_num_threads = inter_op_threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # DequantizeLinear(int8 weight) -> MatMul fuses into MatMulNBits, whose default accuracy level 4
    # quantizes the activations to int8 at run time: weight-only int8 (quantize-int8-weights, Os, Oz)
    # promises fp32 activations (measured: 0.0099 off the Program at level 4, 0 at level 0)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    return so


def _loads(ort: Any, model: Any) -> str | None:
    """None if ORT can build a session for ``model`` at the level runners use, else the reason.

    At "all": some graphs load at "basic" and fail shape inference once ORT's
    extended optimizers re-resolve them (a fused graph with a rank-3 ``Gemm`` input)."""
    so = session_options(level="all", log_severity=4)
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        return first_line(e, with_type=False, limit=200)
    return None


def _ir_copy(model: Any) -> Any:
    """``model`` as an onnx_ir model that shares nothing with it: the rewriters edit what they are
    given, and an IR read straight from the proto edits the proto too (measured: onnxscript's
    transformer fusions left a Llama int8 export with a dangling input), which the fallback of
    every caller below then saves."""
    import onnx
    import onnx_ir as ir

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return ir.serde.deserialize_model(copy)


def _ort_fusions(model: Any) -> tuple[Any, dict[str, int]]:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    fused, counts = optimize_for_ort(_ir_copy(model))
    return ir.serde.serialize_model(fused), {k: int(v) for k, v in counts.items() if v}


def _qdq_fusions(model: Any) -> tuple[Any, dict[str, int]]:
    """The transformer fusions of ``optimize_for_ort`` (attention -> MultiHeadAttention,
    SkipLayerNormalization, BiasGelu) without its FusedMatMul rules, which fold
    DQ->Transpose->MatMul and so block ORT's integer kernels. ``fuse_xformers`` is
    onnxscript's own step of ``optimize_for_ort`` (private module, onnxscript 0.7)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions._core import fuse_xformers

    fused, counts = fuse_xformers(_ir_copy(model))
    return ir.serde.serialize_model(fused), {k: int(v) for k, v in counts.items() if v}


def _integer_ops(ort: Any, model: Any) -> int:
    """How many integer kernels ORT's optimized graph of ``model`` runs."""
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "model.onnx"
        save_onnx(model, path)
        optimized = _optimized_graph(ort, path, Path(td) / "opt.onnx")
    return sum(qdq_report(optimized)["integer_ops"].values())


def _optimized_graph(ort: Any, path: Path, out: Path) -> Any:
    import onnx

    so = session_options(level="all", optimized_model_path=str(out))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(out))


def qdq_report(optimized: Any) -> dict[str, Any]:
    """Integer kernels vs float compute ops still reading dequantized tensors."""
    producers = {o: n for n in optimized.graph.node for o in n.output}
    integer = {}
    float_on_dq = 0
    for n in optimized.graph.node:
        if n.op_type in INTEGER_OPS:
            integer[n.op_type] = integer.get(n.op_type, 0) + 1
        elif n.op_type in _FLOAT_COMPUTE and any(
            (p := producers.get(i)) is not None and p.op_type == "DequantizeLinear" for i in n.input
        ):
            float_on_dq += 1
    return {"integer_ops": dict(sorted(integer.items())), "float_ops_on_dequantized": float_on_dq}


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self._session: Any = None

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        assert self.artifact is not None
        opts = self.options
        so = session_options(
            level=opts["graph_optimization_level"],
            intra_op_threads=opts["intra_op_threads"],
            inter_op_threads=opts["inter_op_threads"],
            spin=opts["spin"],
            optimized_model_path=opts["optimized_model_path"],
        )
        path = self.artifact.entry
        optimized = self.artifact.backend.get("optimized")
        if opts["use_optimized"] and optimized:
            path = self.artifact.file(optimized)  # checked and covered by a checksum (read_artifact)
        available = set(ort.get_available_providers())
        providers = [p for p in opts["providers"] if p in available]
        if not providers:
            raise RunnerError(
                f"onnxruntime | none of the providers {opts['providers']} is available; have {sorted(available)}"
            )
        self.device = "cuda" if providers[0].startswith(("CUDA", "Tensorrt")) else "cpu"
        self._session = ort.InferenceSession(str(path), so, providers=providers)
        self._out_names = [o.name for o in self._session.get_outputs()]

    def _infer_impl(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        feeds = {spec.name: t.detach().cpu().contiguous().numpy() for spec, t in zip(self.inputs, inputs)}
        outputs = self._session.run(self._out_names, feeds)
        return tuple(torch.from_numpy(o) for o in outputs)

    def _deactivate_impl(self) -> None:
        self._session = None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    summary = "ONNX (dynamo exporter) + onnxscript ORT fusions, run by ONNX Runtime"
    lower_options = (
        Option("opset", int, None, "ONNX opset (default: the exporter's)"),
        Option("fusions", str, "auto", "onnxscript optimize_for_ort fusions: auto (on unless the "
                      "Program is QDQ int8), on, off", choices=("auto", "on", "off")),
        Option("slim", bool, False, "simplify with onnxslim"),
        Option("save_optimized", bool, False,
                      "also store ORT's optimized graph (model.optimized.onnx; same-machine only)"),
    )
    runner_options = (
        Option("intra_op_threads", int, 0, "threads inside an op (0 = ORT default)"),
        Option("inter_op_threads", int, 0, "threads across ops (0 = ORT default)"),
        Option("graph_optimization_level", str, "all", "ORT graph optimizations", choices=_LEVELS),
        Option("providers", list, ("CPUExecutionProvider",), "execution providers, in order"),
        Option("use_optimized", bool, True, "load model.optimized.onnx when the artifact has one"),
        Option("optimized_model_path", str, "", "write ORT's optimized graph here (inspection)"),
        Option("spin", bool, True, "idle intra-op threads spin for the next call (lowest latency on "
                      "dedicated cores; the benchmark harness turns it off so it does not slow other variants)"),
    )
    runner_class = OnnxRuntimeRunner

    def artifact_files(self, backend: Mapping[str, Any]) -> list[str]:
        optimized = backend.get("optimized")
        return [backend["entry"], *([optimized] if optimized else [])]

    def unavailable_reason(self) -> str | None:
        for pkg in ("onnx", "onnxruntime", "onnxscript", "onnx_ir"):
            try:
                __import__(pkg)
            except ImportError:
                return f"package '{pkg}' is not installed (pip install 'graphopt[onnx]')"
        return None

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime
        import onnxscript

        return {"backend": onnxruntime.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}

    def check_program(self, program: Program, options: Mapping[str, Any]) -> None:
        if torch.bfloat16 in program_dtypes(program):
            pipeline = program.pipeline or ""
            fix = ("drop mixed=bf16 from quantize-int8 (int8 with fp32 elsewhere runs here)" if "mixed=bf16" in pipeline
                   else "drop the bf16 pass from the pipeline" if "bf16" in pipeline else
                   "capture the model after model.float() (its weights or inputs are bf16 as captured)")
            raise LoweringError(
                f"onnxruntime | {program.name} computes in bfloat16 and ONNX Runtime's CPU provider has no "
                f"bf16 kernels; lower it with the inductor runtime, or {fix}"
            )

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        import onnxruntime as ort

        model = export_onnx(program, opset=options["opset"])
        info: dict[str, Any] = {"entry": "model.onnx", "exported_ops": op_counts(model)}
        quantized = is_quantized(program)
        if quantized:
            info["qdq_gemm_bias_split"] = split_qdq_gemm_bias(model)
        fusions = options["fusions"]
        if fusions == "auto" and quantized:
            # optimize_for_ort's FusedMatMul rules fold DQ->Transpose->MatMul, which ORT's QDQ
            # transformer then cannot turn into integer kernels (measured: 13 -> 0 on bert4rec
            # int8); its transformer fusions alone keep them, which is checked here
            try:
                fused, counts = _qdq_fusions(model)
                reason = _loads(ort, fused)
                if reason is None and _integer_ops(ort, fused) < _integer_ops(ort, model):
                    reason = "the fused graph ran fewer integer kernels"
            except Exception as e:  # onnxscript rewriter errors are not typed; ImportError: no fuse_xformers
                fused, counts, reason = None, {}, first_line(e, with_type=True, limit=200)
            if reason is None:
                model = fused
                info["fusions"] = {**counts, "qdq": "transformer fusions only (no FusedMatMul)"}
            else:
                log.info("onnxruntime | QDQ transformer fusions skipped for %s: %s", program.name, reason)
                info["fusions"] = {"skipped": reason}
        elif fusions != "off":
            try:
                fused, counts = _ort_fusions(model)
                reason = _loads(ort, fused)
            except Exception as e:  # onnxscript rewriter errors are not typed
                fused, counts, reason = None, {}, first_line(e, with_type=True, limit=200)
            if reason is None:
                model = fused
                info["fusions"] = counts
            else:
                log.info("onnxruntime | ORT fusions skipped for %s: %s", program.name, reason)
                info["fusions"] = {"skipped": reason}
        if options["slim"]:
            import onnxslim

            try:
                slimmed = onnxslim.slim(model)
                reason = _loads(ort, slimmed)
            except Exception as e:
                slimmed, reason = None, first_line(e, with_type=True, limit=200)
            if reason is None:
                model = slimmed
                info["slim"] = "applied"
            else:
                info["slim"] = f"skipped: {reason}"
        info["files"] = save_onnx(model, out / "model.onnx", program.parameter_bytes())
        info["ops"] = op_counts(model)
        if options["save_optimized"] or quantized:
            with tempfile.TemporaryDirectory() as td:
                target = out / "model.optimized.onnx" if options["save_optimized"] else Path(td) / "opt.onnx"
                optimized = _optimized_graph(ort, out / "model.onnx", target)
            if options["save_optimized"]:
                info["optimized"] = "model.optimized.onnx"
            if quantized:
                info["qdq"] = qdq_report(optimized)
        info["weights_external"] = len(info["files"]) > 1
        del info["files"]
        return info


BACKEND = OnnxRuntimeBackend()
