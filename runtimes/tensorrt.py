"""``tensorrt``: ONNX -> TensorRT 10 engine, run with torch CUDA tensors.

Lowering: :func:`graphopt.runtimes.onnx_export.export_onnx` (the same
exporter as onnxruntime, without ORT-only fusions; ``for_tensorrt``: uint8
embedding codes gathered as int32 words), the static checker
(:mod:`graphopt.runtimes.tensorrt_check`) to fail early with a readable
reason, then ``tensorrt.Builder`` + ``OnnxParser`` -> serialized engine with
one optimization profile covering every dynamic input (min/opt/max per
label from the ``profile`` option, defaulting to 1 / example size / the range
torch.export proved, capped at 64 for batch and 512 for others). Precision
flags follow the Program: FP16/BF16 builder flags for half-precision
Programs, INT8 only through explicit Q/DQ nodes (implicit calibration is
deprecated in TensorRT 10); ``fp16=True`` also lets TensorRT pick fp16
kernels for a fp32 Program. A timing cache speeds up rebuilds.

Needs the ``tensorrt`` package and a CUDA device; elsewhere it reports
itself unavailable (``graphopt runtimes``) and ``graphopt check-tensorrt``
is the static substitute. ``benchmarks/tensorrt_gpu.py`` runs this path end
to end on a GPU machine.

Artifact: ``model.engine`` (+ ``model.onnx``, ``timing.cache``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from graphopt.runtimes.onnx_export import export_onnx, save_onnx

from graphopt.errors import LoweringError, RunnerError, first_line
from graphopt.ir.program import Program
from graphopt.runtime import Backend, Option, Runner, dim_ranges, is_quantized, program_dtypes

__all__ = ["TensorRTBackend", "TensorRTRunner", "BACKEND", "parse_profile", "default_profile"]

log = logging.getLogger(__name__)

_DEFAULT_MAX = {"batch": 64}
_OTHER_MAX = 512


def parse_profile(text: str) -> dict[str, tuple[int, int, int]]:
    """``"batch=1:8:64,seq=8:64:512"`` -> ``{"batch": (1, 8, 64), ...}``."""
    out: dict[str, tuple[int, int, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        label, _, spec = part.partition("=")
        try:
            lo, opt, hi = (int(x) for x in spec.split(":"))
        except ValueError:
            raise LoweringError(
                f"tensorrt | profile entry {part!r}: expected label=min:opt:max, e.g. batch=1:8:64"
            ) from None
        if not 1 <= lo <= opt <= hi:
            raise LoweringError(f"tensorrt | profile entry {part!r}: need 1 <= min <= opt <= max")
        out[label.strip()] = (lo, opt, hi)
    return out


def default_profile(program: Program, ranges: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """min 1, opt = example size, max = proven bound capped (batch 64, others 512)."""
    out: dict[str, tuple[int, int, int]] = {}
    for spec in program.inputs:
        for dim, label in spec.dynamic.items():
            if label in out:
                continue
            opt = int(spec.shape[dim])
            cap = _DEFAULT_MAX.get(label, _OTHER_MAX)
            bound = (ranges.get(label) or {}).get("max")
            hi = max(opt, min(cap, bound) if bound else cap)
            out[label] = (1, opt, hi)
    return out


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int8: torch.int8,
        trt.bool: torch.bool,
    }
    for name, tdt in (("bfloat16", torch.bfloat16), ("int64", torch.int64), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    if dtype not in table:
        raise RunnerError(f"tensorrt | engine tensor type {dtype} has no torch equivalent")
    return table[dtype]


class TensorRTRunner(Runner):
    """Deserializes the engine; runs on the current torch CUDA stream."""

    name = "tensorrt"

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self._engine: Any = None
        self._context: Any = None

    def _activate_impl(self) -> None:
        import tensorrt as trt

        assert self.artifact is not None
        self.device = "cuda"
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.artifact.entry.read_bytes())
        if self._engine is None:
            raise RunnerError(
                f"tensorrt | could not deserialize {self.artifact.entry} (built by another TensorRT version "
                "or GPU?); re-lower it on this machine"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._in = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._out = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        by_name = {s.name: s for s in self.inputs}
        missing = [n for n in self._in if n not in by_name]
        if missing:
            raise RunnerError(f"tensorrt | engine input '{missing[0]}' is not in the manifest; re-lower it")
        if len(self._out) != len(self.output_names):
            raise RunnerError(
                f"tensorrt | engine has {len(self._out)} outputs, manifest {len(self.output_names)}; re-lower it"
            )

    def _infer_impl(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        feeds = {spec.name: t for spec, t in zip(self.inputs, inputs)}
        keep = []
        for name in self._in:
            t = feeds[name].to("cuda", self._dtypes[name], non_blocking=True).contiguous()
            keep.append(t)
            if not self._context.set_input_shape(name, tuple(t.shape)):
                raise RunnerError(
                    f"tensorrt | input '{name}' shape {list(t.shape)} is outside the engine's optimization "
                    "profile; re-lower with a wider profile= option"
                )
            self._context.set_tensor_address(name, t.data_ptr())
        outputs = []
        for name in self._out:
            shape = tuple(self._context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
            self._context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not self._context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RunnerError("tensorrt | execute_async_v3 failed; rerun with --debug for TensorRT's log")
        return tuple(outputs)

    def _deactivate_impl(self) -> None:
        self._context = None
        self._engine = None


class TensorRTBackend(Backend):
    name = "tensorrt"
    summary = "ONNX -> TensorRT 10 engine (OnnxParser, optimization profile, explicit QDQ int8), CUDA only"
    lower_options = (
        Option("opset", int, None, "ONNX opset for the export"),
        Option("profile", str, "", "min:opt:max per dynamic label, e.g. batch=1:8:64,seq=8:64:512"),
        Option("fp16", bool, False, "allow fp16 kernels for a fp32 Program"),
        Option("workspace_mb", int, 4096, "builder workspace memory pool (MiB)"),
        Option("timing_cache", str, "", "timing cache file to read and update"),
        Option("check", bool, True, "run the static compatibility check first; fail on errors"),
        Option("keep_onnx", bool, True, "store the exported model.onnx in the artifact"),
    )
    runner_class = TensorRTRunner

    def unavailable_reason(self) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "package 'tensorrt' is not installed (pip install 'graphopt[tensorrt]' on a CUDA machine)"
        except Exception as e:  # a broken install raises OSError on missing libnvinfer
            return f"package 'tensorrt' does not import: {first_line(e, with_type=False)}"
        if not torch.cuda.is_available():
            return "no CUDA device (TensorRT engines run on NVIDIA GPUs only)"
        return None

    def versions(self) -> dict[str, str]:
        import tensorrt

        return {"backend": tensorrt.__version__, "cuda": str(torch.version.cuda)}

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        import tensorrt as trt
        from graphopt.runtimes.tensorrt_check import check_onnx

        model = export_onnx(program, opset=options["opset"], for_tensorrt=True)
        if options["check"]:
            errors = [f for f in check_onnx(model) if f.severity == "error"]
            if errors:
                raise LoweringError(
                    f"tensorrt | {program.name} is not TensorRT-compatible ({len(errors)} problems), first: "
                    f"{errors[0]}; see `graphopt check-tensorrt`"
                )
        files = save_onnx(model, out / "model.onnx", program.parameter_bytes())

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(out / "model.onnx")):
            errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise LoweringError(f"tensorrt | OnnxParser rejected {program.name}: {errs[0] if errs else '?'}")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_mb"] << 20)
        dtypes = program_dtypes(program)
        flags = []
        if torch.float16 in dtypes or options["fp16"]:
            flags.append("FP16")
        if torch.bfloat16 in dtypes:
            flags.append("BF16")
        if is_quantized(program):
            flags.append("INT8")  # explicit Q/DQ only: no calibrator is set
        for flag in flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))

        ranges = dim_ranges(program)
        profile_dims = {**default_profile(program, ranges), **parse_profile(options["profile"])}
        profile = builder.create_optimization_profile()
        specs = {s.name: s for s in program.inputs}
        shapes: dict[str, list[list[int]]] = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            spec = specs[tensor.name]
            mins, opts, maxs = [], [], []
            for d, size in enumerate(spec.shape):
                lo, opt, hi = profile_dims.get(spec.dynamic.get(d, ""), (size, size, size))
                mins.append(lo)
                opts.append(opt)
                maxs.append(hi)
            profile.set_shape(tensor.name, mins, opts, maxs)
            shapes[tensor.name] = [mins, opts, maxs]
        config.add_optimization_profile(profile)

        cache_path = Path(options["timing_cache"]) if options["timing_cache"] else None
        cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)

        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise LoweringError(f"tensorrt | engine build failed for {program.name}; rerun with --debug -v")
        (out / "model.engine").write_bytes(bytes(engine))
        serialized_cache = bytes(config.get_timing_cache().serialize())
        (out / "timing.cache").write_bytes(serialized_cache)
        if cache_path:
            cache_path.write_bytes(serialized_cache)
        if not options["keep_onnx"]:
            for name in files:
                (out / name).unlink()
        return {"entry": "model.engine", "device": "cuda", "precision_flags": flags, "profile": shapes}


BACKEND = TensorRTBackend()
