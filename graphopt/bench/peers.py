"""Peer recipes: what users would deploy instead of graphopt, measured in the
same run on the same inputs.

=========================  ======================================================
``torch.compile``          Inductor with freezing, fp32
``torch.compile-bf16``     the same under ``torch.autocast("cpu", bfloat16)``
``torch.compile-bf16-max-autotune``  the same with ``mode="max-autotune"`` (GEMM
                           autotuning with Inductor's CPP template, as graphopt's
                           inductor lowers base-size models by default)
``ort``                    ONNX export + ONNX Runtime transformer optimizer
                           (what Optimum's ORTOptimizer runs) + ORT_ENABLE_ALL
``ort-int8-dynamic``       the above + ``onnxruntime.quantization.quantize_dynamic``
                           (Optimum's ORTQuantizer, dynamic int8 weights)
``torchao-int8-dynamic``   torchao ``Int8DynamicActivationInt8WeightConfig`` + compile
``torch.ao-int8-dynamic``  ``torch.ao.quantization.quantize_dynamic`` on nn.Linear (eager)
``torchao-pt2e-int8``      torchao PT2E static int8: ``torch.export`` +
                           ``X86InductorQuantizer`` (default config), calibrated,
                           converted, compiled with freezing (oneDNN qlinear)
``torchao-pt2e-int8-bf16`` the same compiled and run under bf16 autocast
                           (int8-mixed-bf16)
=========================  ======================================================

``torch.compile`` peers compile lazily: their compile time is the first call.
A peer that fails to build (or to answer its first call) is reported as failed
with the reason, never dropped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.bench.ort_peer import build_ort_peers, ort_session
from graphopt.bench.pipelines import NO_BF16_KERNELS, split_bf16
from graphopt.bench.variants import Variant
from graphopt.errors import first_line
from graphopt.ir.program import Program, positional
from graphopt.passlib.calibration import default_calibration

__all__ = ["PEERS", "PT2E_CALIBRATION_BATCHES", "build_peers", "default_peers", "ort_session"]

log = logging.getLogger(__name__)

PEERS = (
    "torch.compile",
    "torch.compile-bf16",
    "torch.compile-bf16-max-autotune",
    "ort",
    "ort-int8-dynamic",
    "torchao-int8-dynamic",
    "torch.ao-int8-dynamic",
    "torchao-pt2e-int8",
    "torchao-pt2e-int8-bf16",
)


def default_peers(bf16_kernels: bool | None = None) -> tuple[list[str], str | None]:
    """What ``peers=True`` (``graphopt bench --peers``) measures: every :data:`PEERS` recipe, less
    the bf16 ones on a CPU without bf16 GEMM kernels (:func:`~graphopt.bench.pipelines.split_bf16`),
    and a note naming them (None when none was left out). There torch.compile-bf16 ran
    bert4rec:base at 0.13x eager at batch 32 (AMD EPYC, AVX2 only), and the PT2E int8-bf16 peer's
    batch-1 fidelity calls kept a full ``--peers`` run going past 29 minutes. ``--peer NAME``
    still runs any of them."""
    kept, left = split_bf16(list(PEERS), lambda p: "bf16" in p, bf16_kernels)
    if not left:
        return kept, None
    return kept, (f"peers {', '.join(left)} left out: {NO_BF16_KERNELS} (torch.compile-bf16 0.13x eager on "
                  "bert4rec:base at batch 32, AMD EPYC); name one with --peer to time it anyway")


#: calibration batches the PT2E peers observe (the first of those graphopt's int8 gets)
PT2E_CALIBRATION_BATCHES = 4
_DYNAMIC_EXPORT = "dynamic-shape export"


@contextlib.contextmanager
def _compile_context(bf16: bool) -> Iterator[None]:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    with contextlib.ExitStack() as stack:
        stack.enter_context(inductor_config.patch(freezing=True, autotune_num_choices_displayed=0,
                                                   max_autotune_report_choices_stats=False))
        stack.enter_context(dynamo_config.patch(recompile_limit=64, cache_size_limit=64))
        stack.enter_context(torch.no_grad())
        if bf16:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        yield


def _compiled(module: torch.nn.Module, bf16: bool, mode: str | None = None) -> Callable[..., tuple[torch.Tensor, ...]]:
    compiled = torch.compile(module, mode=mode)

    def fn(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with _compile_context(bf16):
            return tuple(compiled(*inputs))

    return fn


def _param_bytes(module: torch.nn.Module) -> int:
    total = 0
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor):
            try:
                total += t.numel() * t.element_size()
            except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
                total += t.nbytes if hasattr(t, "nbytes") else 0
    return total


def _graph_bytes(module: torch.fx.GraphModule) -> int:
    """Bytes of the tensors the graph reads (PT2E's convert keeps the replaced
    fp32 weights as unused attributes; they are not the model)."""
    state = module.state_dict()
    read = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    return sum(t.nbytes for name, t in state.items() if name in read)


def _eval(module: torch.nn.Module) -> torch.nn.Module:
    """eval() where allowed (torch.export GraphModules refuse train()/eval(); they are inference-only)."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


# -------------------------------------------------------------------- torch peers
_NO_LINEAR = (
    "no nn.Linear module was quantized (the recipe quantizes nn.Linear only: GPT-2's Conv1D layers are not, "
    "and a captured Program has no modules left); benchmark the nn.Module to measure this peer"
)


def _linear_weights(module: torch.nn.Module) -> list[str]:
    """Type names of the nn.Linear weights (they change when a recipe quantizes them)."""
    return [type(m.weight).__name__ for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _build_torchao(source: torch.nn.Module) -> Variant:
    v = Variant("peer: torchao-int8-dynamic", "peer", runtime="inductor", pipeline="torchao int8 dyn + compile")
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        start = time.perf_counter()
        module = _eval(copy.deepcopy(source))
        before = _linear_weights(module)
        quantize_(module, Int8DynamicActivationInt8WeightConfig())
        v.timings["quantize_s"] = time.perf_counter() - start
        if not before or _linear_weights(module) == before:
            return v.fail(f"torchao: {_NO_LINEAR}")
        v.fn = _compiled(module, bf16=False)
        v.size_bytes, v.size_kind = _param_bytes(module), "parameters"
    except Exception as e:  # noqa: BLE001
        v.fail(f"torchao: {first_line(e)}")
    return v


def _build_torch_ao(source: torch.nn.Module) -> Variant:
    v = Variant("peer: torch.ao-int8-dynamic", "peer", runtime="eager", pipeline="quantize_dynamic(nn.Linear)")
    try:
        from torch.ao.quantization import quantize_dynamic

        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = quantize_dynamic(_eval(copy.deepcopy(source)), {torch.nn.Linear}, dtype=torch.qint8)
        v.timings["quantize_s"] = time.perf_counter() - start
        if not any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules()):
            return v.fail(f"torch.ao: {_NO_LINEAR}")

        def fn(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.inference_mode():
                return tuple(module(*inputs))

        v.fn = fn
        v.size_bytes, v.size_kind = _param_bytes(module), "parameters"
    except Exception as e:  # noqa: BLE001
        v.fail(f"torch.ao: {first_line(e)}")
    return v


def _pt2e_batches(program: Program, calibration_data: Sequence[Any] | None) -> tuple[list[tuple[torch.Tensor, ...]], str]:
    """The batches graphopt's int8 pipeline calibrates on (the caller's, else the
    Program's sample inputs), the first few, as positional tuples; and where they come from."""
    given = calibration_data is not None
    data = list(calibration_data if given else default_calibration(program))[:PT2E_CALIBRATION_BATCHES]
    batches = [positional(b, program.input_names, f"calibration_data[{i}]") for i, b in enumerate(data)]
    if not batches:
        raise ValueError("calibration_data is empty; pass calibration batches or leave it unset")
    where = "calibration_data" if given else "Program sample inputs, seeds 1000+ (graphopt.passlib.calibration.default_calibration)"
    return batches, where


def _pt2e_export(source: torch.nn.Module, program: Program, example: tuple[torch.Tensor, ...]) -> tuple[Any, str]:
    """torch.export with the Program's dynamic dims (Dim.AUTO); static at the
    calibration shape where that fails."""
    dims = tuple({d: torch.export.Dim.AUTO for d in s.dynamic} or None for s in program.inputs)
    try:
        return torch.export.export(source, example, dynamic_shapes=(dims,)).module(), _DYNAMIC_EXPORT
    except Exception as e:  # noqa: BLE001 - a static export still measures the calibration shape
        shape = "x".join(str(d) for d in example[0].shape)
        log.info("PT2E dynamic export failed (%s); exporting static", first_line(e))
        note = f"dynamic export failed ({first_line(e)}): static export at {shape}, other shapes fail"
        return torch.export.export(source, example).module(), note


def _build_pt2e(
    source: torch.nn.Module, program: Program, calibration_data: Sequence[Any] | None, wanted: Sequence[str],
) -> list[Variant]:
    int8 = Variant("peer: torchao-pt2e-int8", "peer", runtime="inductor",
                   pipeline="PT2E X86Inductor static int8 + compile + freezing")
    bf16 = Variant("peer: torchao-pt2e-int8-bf16", "peer", runtime="inductor",
                   pipeline="PT2E X86Inductor static int8 + compile + freezing, bf16 autocast")
    variants = [v for v in (int8, bf16) if v.name.removeprefix("peer: ") in wanted]
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (  # registers the oneDNN lowerings
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        batches, where = _pt2e_batches(program, calibration_data)
        start = time.perf_counter()
        with torch.no_grad():
            module, exported = _pt2e_export(source, program, batches[0])
        if exported != _DYNAMIC_EXPORT:  # a static graph calibrates on its own shape only
            shape = [tuple(t.shape) for t in batches[0]]
            batches = [b for b in batches if [tuple(t.shape) for t in b] == shape]
        calibrated = f"calibrated on {len(batches)} batches: {where}"
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        module = prepare_pt2e(module, quantizer)
        with torch.no_grad():
            for b in batches:
                module(*b)
        module = convert_pt2e(module)
        quantize_s = time.perf_counter() - start
        weights = sum(n.target == torch.ops.quantized_decomposed.dequantize_per_channel.default for n in module.graph.nodes)
        if not weights:
            reason = "torchao-pt2e: X86InductorQuantizer quantized no weight (no linear or conv in the exported graph)"
            return [v.fail(reason) for v in variants]
        for v in variants:
            mine = module if v is variants[-1] else copy.deepcopy(module)  # one compiled graph per recipe
            v.timings = {"export_s": export_s, "quantize_s": quantize_s}
            v.notes += [exported, calibrated, f"{weights} int8 per-channel weights"]
            v.fn = _compiled(mine, bf16=v is bf16)
            v.size_bytes, v.size_kind = _graph_bytes(mine), "parameters"
    except Exception as e:  # noqa: BLE001
        reason = f"torchao-pt2e: {first_line(e)}"
        return [v.fail(reason) for v in variants]
    return variants


def build_peers(
    source: torch.nn.Module,
    program: Program,
    work_dir: Path,
    *,
    peers: Sequence[str] = PEERS,
    threads: int | None = None,
    calibration_data: Sequence[Any] | None = None,
) -> list[Variant]:
    """Build the requested peers from ``source`` (the original model, called
    positionally with the Program's inputs, returning a tuple of tensors).
    ``calibration_data``: what graphopt's int8 pipeline gets; the PT2E peers
    calibrate on its first batches (None: the Program's sample inputs, as graphopt)."""
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        from graphopt.errors import GraphoptError

        raise GraphoptError(f"unknown peer(s) {', '.join(unknown)}; peers: {', '.join(PEERS)}")
    source = _eval(source)
    out: list[Variant] = []
    if "torch.compile" in peers:
        out.append(Variant("peer: torch.compile", "peer", runtime="inductor", pipeline="compile + freezing, fp32",
                           fn=_compiled(source, bf16=False), size_bytes=_param_bytes(source), size_kind="parameters"))
    if "torch.compile-bf16" in peers:
        out.append(Variant("peer: torch.compile-bf16", "peer", runtime="inductor", pipeline="compile + freezing, bf16 autocast",
                           fn=_compiled(source, bf16=True), size_bytes=_param_bytes(source), size_kind="parameters"))
    if "torch.compile-bf16-max-autotune" in peers:
        out.append(Variant("peer: torch.compile-bf16-max-autotune", "peer", runtime="inductor",
                           pipeline="compile mode=max-autotune + freezing, bf16 autocast",
                           fn=_compiled(source, bf16=True, mode="max-autotune"), size_bytes=_param_bytes(source),
                           size_kind="parameters"))
    if "ort" in peers or "ort-int8-dynamic" in peers:
        out += [v for v in build_ort_peers(source, program, work_dir, threads) if v.name.removeprefix("peer: ") in peers]
    if "torchao-int8-dynamic" in peers:
        out.append(_build_torchao(source))
    if "torch.ao-int8-dynamic" in peers:
        out.append(_build_torch_ao(source))
    if "torchao-pt2e-int8" in peers or "torchao-pt2e-int8-bf16" in peers:
        out += _build_pt2e(source, program, calibration_data, peers)
    return out
