"""The ONNX Runtime peers: ``ort`` (ONNX export + the transformer optimizer Optimum's
ORTOptimizer runs + ORT_ENABLE_ALL) and ``ort-int8-dynamic`` (the same +
``onnxruntime.quantization.quantize_dynamic``, Optimum's ORTQuantizer recipe).
Used by :func:`graphopt.bench.peers.build_peers`."""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.bench.variants import Variant, dir_size
from graphopt.errors import first_line
from graphopt.hardware import has_int8_dot
from graphopt.ir.program import Program

__all__ = ["build_ort_peers", "ort_session"]

log = logging.getLogger(__name__)


def _hf_config(module: torch.nn.Module) -> Any | None:
    for m in module.modules():
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "model_type", None):
            return config
    return None


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    from graphopt.runtimes.onnxruntime import session_options

    # no idle spinning, as for graphopt's own ORT variants: it slows the variant timed next
    options = session_options(level="all", intra_op_threads=threads or 0, spin=False)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_fn(session: Any) -> Callable[..., tuple[torch.Tensor, ...]]:
    names = [i.name for i in session.get_inputs()]
    return lambda *inputs, _names=names: _ort_run(session, _names, inputs)


def _ort_run(session: Any, names: list[str], inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    feeds = {n: x.numpy() for n, x in zip(names, inputs)}
    return tuple(torch.from_numpy(o) for o in session.run(None, feeds))


def _export_onnx(source: torch.nn.Module, program: Program, path: Path) -> None:
    """Export as Optimum does (the TorchScript-based exporter), named dynamic axes;
    fall back to the dynamo exporter where the TorchScript one fails."""
    args = tuple(program.sample_inputs())
    names = program.input_names
    dynamic_axes = {s.name: {d: label for d, label in s.dynamic.items()} for s in program.inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                source, args, str(path), input_names=names, output_names=list(program.output_names),
                dynamic_axes=dynamic_axes, dynamo=False, opset_version=17,
            )
            return
        except Exception as e:  # noqa: BLE001 - try the other exporter before failing
            log.info("TorchScript ONNX export failed (%s); trying dynamo=True", first_line(e))
        dims: Any = tuple(
            {d: torch.export.Dim.AUTO for d in s.dynamic} or None for s in program.inputs
        )
        params = list(inspect.signature(source.forward).parameters.values())
        if len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
            dims = {params[0].name: dims}  # forward(*args) (SourceModule): one spec for the varargs tuple
        torch.onnx.export(
            source, args, str(path), input_names=names, output_names=list(program.output_names),
            dynamic_shapes=dims, dynamo=True, external_data=False, verbose=False,
        )


def _ort_optimize(source: torch.nn.Module, exported: Path, out: Path) -> str:
    """ORT's transformer optimizer for BERT-like models; other models keep the
    exported graph and get ORT_ENABLE_ALL at session creation."""
    config = _hf_config(source)
    if config is None or config.model_type not in ("bert", "roberta", "distilbert", "albert", "electra"):
        out.write_bytes(exported.read_bytes())
        return "no transformer optimizer model type for this model: ORT_ENABLE_ALL session optimizations only"
    from onnxruntime.transformers import optimizer

    opt = optimizer.optimize_model(
        str(exported), model_type="bert",
        num_heads=int(config.num_attention_heads), hidden_size=int(config.hidden_size),
    )
    opt.save_model_to_file(str(out))
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    return "transformer optimizer fused: " + (", ".join(f"{k}={v}" for k, v in sorted(fused.items())) or "nothing")


def build_ort_peers(source: torch.nn.Module, program: Program, work_dir: Path, threads: int | None) -> list[Variant]:
    fp32 = Variant("peer: ort", "peer", runtime="onnxruntime", pipeline="export + transformer optimizer")
    int8 = Variant("peer: ort-int8-dynamic", "peer", runtime="onnxruntime", pipeline="+ quantize_dynamic int8")
    folder = work_dir / "peer-ort"
    folder.mkdir(parents=True, exist_ok=True)
    exported, optimized, quantized = folder / "exported.onnx", folder / "optimized.onnx", folder / "int8.onnx"
    try:
        start = time.perf_counter()
        _export_onnx(source, program, exported)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        fp32.notes.append(_ort_optimize(source, exported, optimized))
        fp32.timings = {"export_s": export_s, "optimize_s": time.perf_counter() - start}
        start = time.perf_counter()
        fp32.fn = _ort_fn(ort_session(optimized, threads))
        fp32.timings["load_s"] = time.perf_counter() - start
        fp32.size_bytes, fp32.size_kind = dir_size(optimized), "onnx"
        fp32.memory_target = {"kind": "onnx", "path": str(optimized)}
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not hidden
        root = e
        while root.__cause__ is not None:  # the exporter wraps the cause in a "step 1/3" banner
            root = root.__cause__
        reason = f"onnx export/optimize: {first_line(e)}" + (f" ({first_line(root, with_type=True)})"
                                                            if root is not e else "")
        return [fp32.fail(reason), int8.fail(reason)]
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        start = time.perf_counter()
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # ORT's quantizer warns on the root logger
        try:  # DefaultTensorType: the optimizer's contrib ops have no inferred output types
            quantize_dynamic(
                str(optimized), str(quantized), weight_type=QuantType.QInt8,
                reduce_range=not has_int8_dot(),  # as graphopt's int8 passes: 7-bit weights where int16 saturates
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        finally:
            logging.disable(previous)
        int8.timings = {**fp32.timings, "quantize_s": time.perf_counter() - start}
        start = time.perf_counter()
        int8.fn = _ort_fn(ort_session(quantized, threads))
        int8.timings["load_s"] = time.perf_counter() - start
        int8.size_bytes, int8.size_kind = dir_size(quantized), "onnx"
        int8.memory_target = {"kind": "onnx", "path": str(quantized)}
    except Exception as e:  # noqa: BLE001
        int8.fail(f"quantize_dynamic: {first_line(e)}")
    return [fp32, int8]
