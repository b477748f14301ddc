"""``tensorrt``: ONNX -> TensorRT engine (10.x and 11.x), run with torch CUDA tensors.

Lowering: :func:`graphopt.runtimes.onnx_export.export_onnx` (the same
exporter as onnxruntime, without ORT-only fusions; ``for_tensorrt``: uint8
embedding codes gathered as int32 words), the static checker
(:mod:`graphopt.runtimes.tensorrt_check`) to fail early with a readable
reason, then ``tensorrt.Builder`` + ``OnnxParser`` -> serialized engine with
one optimization profile covering every dynamic input (:func:`profile_shapes`:
min/opt/max per label from the ``profile`` option, defaulting to the proven
min / example size / the range torch.export proved, capped at 64 for batch
and 512 for others; a label the Program lacks or a max past its proven bound
is refused). The network is strongly typed (TensorRT 11 builds nothing else;
10.x gets the ``STRONGLY_TYPED`` creation flag): precision comes from the
ONNX graph, i.e. from the Program (``-p 'cast{dtype=fp16}'``, explicit Q/DQ
from ``quantize-int8{activations=int8}``), never from builder flags, which
TensorRT 11 removed. TF32 stays on for fp32 math (TensorRT's default,
``tf32=false`` turns it off). A timing cache speeds up rebuilds.

Needs the ``tensorrt`` package and a CUDA device; elsewhere it reports
itself unavailable (``graphopt runtimes``) and ``graphopt check-tensorrt``
is the static substitute. ``benchmarks/tensorrt_gpu.py`` runs this path end
to end on a GPU machine. Threads may share a runner: its one execution
context is used under the runner's lock, one call at a time.

Artifact: ``model.engine`` (+ ``model.onnx``, ``timing.cache``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from graphopt.runtimes.onnx_export import export_onnx, save_onnx

from graphopt.errors import LoweringError, RunnerError, first_line
from graphopt.ir.program import Program
from graphopt.runtime import Backend, Option, Runner, dim_ranges

__all__ = [
    "TensorRTBackend", "TensorRTRunner", "BACKEND", "parse_profile", "default_profile", "profile_shapes",
    "engine_flags", "compatibility_refusal", "int8_fix",
]

log = logging.getLogger(__name__)

_DEFAULT_MAX = {"batch": 64}
_OTHER_MAX = 512
#: what replaces the removed ``fp16`` option and the weak-typing flags TensorRT 11 dropped
FP16_HINT = "cast the Program first: -p 'cast{dtype=fp16}'"
INT8_HINT = "quantize with -p 'quantize-int8{activations=int8}' (symmetric int8, zero point 0)"


def engine_flags(version: str, tf32: bool = True) -> dict[str, list[str]]:
    """The ``NetworkDefinitionCreationFlag`` names to set and the ``BuilderFlag`` names to clear
    for TensorRT ``version``. Never a precision flag: TensorRT 11 removed FP16/BF16/INT8 (10.12
    deprecated them) and strongly typed networks take their types from the ONNX graph.
    10.x: ``STRONGLY_TYPED`` (opt-in there); 11.x: none (always strongly typed, the flag is
    deprecated and ignored). TF32 is on by default in every version; ``tf32=False`` clears it."""
    match = re.match(r"\s*(\d+)\.", version)
    if not match or int(match.group(1)) < 10:
        raise LoweringError(f"tensorrt | TensorRT {version!r} is not supported; pip install 'tensorrt>=10'")
    network = ["STRONGLY_TYPED"] if int(match.group(1)) == 10 else []
    return {"network": network, "clear": [] if tf32 else ["TF32"]}


def _fp16_removed(value: bool) -> str | None:
    if value:
        return f"removed (TensorRT builds strongly typed networks: the Program's dtypes rule); {FP16_HINT}"
    return None


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
    """min = proven min (1 when unknown), opt = example size, max = proven bound capped
    (batch 64, others 512); opt is kept inside [min, max]."""
    out: dict[str, tuple[int, int, int]] = {}
    for spec in program.inputs:
        for dim, label in spec.dynamic.items():
            if label in out:
                continue
            proven = ranges.get(label) or {}
            lo = max(1, int(proven.get("min") or 1))
            cap = _DEFAULT_MAX.get(label, _OTHER_MAX)
            bound = proven.get("max")
            hi = max(lo, min(cap, bound) if bound else cap)
            out[label] = (lo, min(max(int(spec.shape[dim]), lo), hi), hi)
    return out


def profile_shapes(program: Program, ranges: Mapping[str, Mapping[str, Any]], text: str = "") -> dict[str, list[list[int]]]:
    """Per Program input, ``[mins, opts, maxs]`` for the optimization profile: the ``profile``
    option's entries (``text``) over :func:`default_profile`, static dims fixed. A label the
    Program has no dim for, or a min/max outside what torch.export proved, is refused."""
    given = parse_profile(text)
    labels = sorted({label for spec in program.inputs for label in spec.dynamic.values()})
    for label, (lo, _, hi) in given.items():
        if label not in labels:
            known = ", ".join(labels) or "none"
            raise LoweringError(f"tensorrt | profile label '{label}' is not a dynamic dim of {program.name}; "
                                f"use its labels: {known}")
        proven = ranges.get(label) or {}
        if proven.get("max") and hi > proven["max"]:
            raise LoweringError(f"tensorrt | profile {label} max {hi} is above {proven['max']}, the largest {label} "
                                f"{program.name} accepts; use a max <= {proven['max']}")
        if proven.get("min") and lo < proven["min"]:
            raise LoweringError(f"tensorrt | profile {label} min {lo} is below {proven['min']}, the smallest {label} "
                                f"{program.name} accepts; use a min >= {proven['min']}")
    dims = {**default_profile(program, ranges), **given}
    shapes: dict[str, list[list[int]]] = {}
    for spec in program.inputs:
        per_dim = [dims[spec.dynamic[d]] if d in spec.dynamic else (int(s),) * 3 for d, s in enumerate(spec.shape)]
        shapes[spec.name] = [[int(t[i]) for t in per_dim] for i in range(3)]
    return shapes


def int8_fix(findings: Sequence[Any]) -> tuple[Any, str] | None:
    """``(finding, fix)`` when the checker's errors are an int8 form TensorRT rejects
    (dynamic or asymmetric/uint8 Q/DQ), else None."""
    errors = [f for f in findings if f.severity == "error"]
    dynamic = [f for f in errors if f.op == "DynamicQuantizeLinear"]
    if dynamic:
        return dynamic[0], f"quantize-int8-dynamic can never run on TensorRT (no DynamicQuantizeLinear); {INT8_HINT}"
    qdq = [f for f in errors if f.rule == "qdq"]
    if qdq:
        return qdq[0], f"TensorRT takes symmetric int8 Q/DQ only; {INT8_HINT}"
    return None


def compatibility_refusal(name: str, findings: Sequence[Any]) -> str | None:
    """The one-line refusal for the checker's ``findings`` on ``name``'s ONNX graph (None when no
    error): the first problem, and the fix where graphopt has one."""
    errors = [f for f in findings if f.severity == "error"]
    if not errors:
        return None
    first, fix = int8_fix(errors) or (errors[0], "see `graphopt check-tensorrt`")
    return f"tensorrt | {name} is not TensorRT-compatible ({len(errors)} problems), first: {first}; {fix}"


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
        # one IExecutionContext: its input shapes, tensor addresses and scratch memory are shared
        # state, so threads sharing this runner take turns, each call until its work is done
        with self._lock:
            self.ensure_active()  # another thread may have closed the runner while this call waited
            context = self._context
            keep = []
            for name in self._in:
                t = feeds[name].to("cuda", self._dtypes[name], non_blocking=True).contiguous()
                keep.append(t)
                if not context.set_input_shape(name, tuple(t.shape)):
                    raise RunnerError(
                        f"tensorrt | input '{name}' shape {list(t.shape)} is outside the engine's optimization "
                        "profile; re-lower with a wider profile= option"
                    )
                context.set_tensor_address(name, t.data_ptr())
            outputs = []
            for name in self._out:
                shape = tuple(context.get_tensor_shape(name))
                out = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
                context.set_tensor_address(name, out.data_ptr())
                outputs.append(out)
            stream = torch.cuda.current_stream()
            if not context.execute_async_v3(stream.cuda_stream):
                raise RunnerError("tensorrt | execute_async_v3 failed; rerun with --debug for TensorRT's log")
            stream.synchronize()  # the next call may reuse the context once this one's kernels are done
        return tuple(outputs)

    def _deactivate_impl(self) -> None:
        self._context = None
        self._engine = None


class TensorRTBackend(Backend):
    name = "tensorrt"
    summary = ("ONNX -> TensorRT 10/11 engine (OnnxParser, strongly typed, optimization profile, explicit QDQ "
               "int8), CUDA only")
    lower_options = (
        Option("opset", int, None, "ONNX opset for the export"),
        Option("profile", str, "", "min:opt:max per dynamic label, e.g. batch=1:8:64,seq=8:64:512"),
        Option("tf32", bool, True, "let fp32 matmuls use TF32 (TensorRT's default; ~1e-3 relative error)"),
        Option("fp16", bool, False, f"removed: {FP16_HINT}", check=_fp16_removed),
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

    def check_program(self, program: Program, options: Mapping[str, Any]) -> None:
        profile_shapes(program, dim_ranges(program), options["profile"])  # a bad profile fails before export

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        import tensorrt as trt
        from graphopt.runtimes.tensorrt_check import check_onnx

        flags = engine_flags(trt.__version__, options["tf32"])
        shapes = profile_shapes(program, dim_ranges(program), options["profile"])
        model = export_onnx(program, opset=options["opset"], for_tensorrt=True)
        refusal = compatibility_refusal(program.name, check_onnx(model)) if options["check"] else None
        if refusal:
            raise LoweringError(refusal)
        files = save_onnx(model, out / "model.onnx", program.parameter_bytes())

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network_flags = 0
        for name in flags["network"]:
            network_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
        network = builder.create_network(network_flags)  # strongly typed: types come from the ONNX graph
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(out / "model.onnx")):
            errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise LoweringError(f"tensorrt | OnnxParser rejected {program.name}: {errs[0] if errs else '?'}; "
                                "run `graphopt check-tensorrt` on it")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_mb"] << 20)
        for name in flags["clear"]:
            config.clear_flag(getattr(trt.BuilderFlag, name))

        profile = builder.create_optimization_profile()
        used: dict[str, list[list[int]]] = {}
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            profile.set_shape(name, *shapes[name])
            used[name] = shapes[name]
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
        return {"entry": "model.engine", "device": "cuda", "network_flags": flags["network"],
                "tf32": options["tf32"], "profile": used}


BACKEND = TensorRTBackend()
