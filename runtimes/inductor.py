"""``inductor``: an AOTInductor package compiled from the re-exported Program.

``torch._inductor.aoti_compile_and_package(program.export(), ...)`` with
``freezing`` (weights folded into the compiled code) and the Program's
dynamic dims kept symbolic, so one package serves every batch size and
sequence length (no recompile per shape). Compiling is slow (tens of seconds
for a tiny model on 2 cores, minutes for base models); loading is fast.
This is the fastest CPU path for bf16 and oneDNN int8.

Artifact: ``model.pt2`` (the AOTI package) and, where ``split_rows`` is on (a float32
Program on a CPU whose MKL is not Intel's tuned one, :func:`split_rows_by_default`),
``model_rows.pt2``, the same Program compiled with plain weights, which the runner
calls from that many rows per call on. Runs on CUDA when lowered with
``device=cuda`` (``auto`` picks CUDA where present).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from graphopt.runtimes.inductor_autotune import (
    MAX_REL_ERROR,
    autotune_by_default,
    heap_is_checked,
    narrowing_epilogues,
    package_check,
)
from graphopt.runtimes.inductor_compile import FreshCompile, compile_package
from graphopt.runtimes.inductor_constants import flat_outputs, load_aligned
from graphopt.runtimes.inductor_program import check_weight_zero_points, export_on, unfuse_linear_act
from graphopt.runtimes.torch_graph import to_device

from graphopt.hardware import has_fast_mkl
from graphopt.ir.program import Program
from graphopt.runtime import Backend, Option, Runner, resolve_device
from graphopt.runtime.backend import is_quantized, program_dtypes

__all__ = ["InductorBackend", "InductorRunner", "BACKEND", "export_on", "inductor_configs", "unfuse_linear_act"]

log = logging.getLogger(__name__)


class InductorRunner(Runner):
    name = "inductor"

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self._packages: list[tuple[Any, Any]] = []  # (model, flat run): the entry, then the split's
        self._split: tuple[int, int, tuple[int, ...]] | None = None  # from_rows, input index, its dynamic dims
        #: per package: how many constants sat off a cache line and what moved onto 64-byte boundaries
        #: (runtimes/inductor_constants.py), or why the package loader placed them (not the CPU, a failure)
        self.constant_placement: list[dict[str, Any] | str] = []

    def _activate_impl(self) -> None:
        import torch._inductor

        assert self.artifact is not None
        backend = self.artifact.manifest["backend"]
        self.device = resolve_device(backend.get("device", "cpu"), self.name)
        for name in BACKEND.artifact_files(backend):  # the entry, then the split's package
            path = str(self.artifact.file(name))
            aligned = self._aligned(path)
            if aligned is not None:
                self._packages.append((aligned, aligned))
                continue
            model = torch._inductor.aoti_load_package(path)
            self._packages.append((model, _flat_runner(model)))
        if "split" in backend:
            index = next(i for i, spec in enumerate(self.inputs) if spec.dynamic)
            self._split = (int(backend["split"]["from_rows"]), index, tuple(sorted(self.inputs[index].dynamic)))

    def _infer_impl(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        flat = [t.contiguous() for t in to_device(inputs, self.device)]
        model, boxed_run = self._packages[0]
        if self._split is not None:
            from_rows, index, dims = self._split
            if math.prod(flat[index].shape[d] for d in dims) >= from_rows:
                model, boxed_run = self._packages[1]
        with torch.no_grad():  # not inference_mode: callers may edit the scores they get (masked_fill_)
            if boxed_run is not None:
                return tuple(boxed_run(flat))
            out = model(*flat)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _aligned(self, path: str) -> Any:
        """The CPU package, its constants 64-byte aligned (with ``align_constants`` off, where
        AOTInductor put them), or None where the device is not the CPU or loading it so fails:
        then the package loader's. ``constant_placement`` says which and why."""
        if self.device != "cpu":
            self.constant_placement.append(f"left as loaded (device {self.device})")
            return None
        aligned, placement = load_aligned(path, move=bool(self.options.get("align_constants", True)))
        if aligned is None:
            log.warning("%s: %s", path, placement)
        self.constant_placement.append(placement)
        return aligned

    def _deactivate_impl(self) -> None:
        for model, _ in self._packages:
            if hasattr(model, "close"):
                model.close()
        self._packages, self._split, self.constant_placement = [], None, []


def _flat_runner(model: Any) -> Any:
    """The package loader's ``boxed_run`` (flat tensors in, flat list out) when the model's
    outputs are a flat tuple/list, else None. The package's ``__call__`` parses both call
    specs from JSON and walks pytrees on every call: 0.05 of 0.56 ms per gpt-rec:base step."""
    loader = getattr(model, "loader", None)
    return loader.boxed_run if loader is not None and flat_outputs(loader) else None


def _check_backends(text: str) -> str | None:
    bad = [b for b in text.upper().split(",") if b not in ("CPP", "ATEN", "TRITON")]
    return f"unknown GEMM backend(s) {', '.join(bad)}; choose from CPP, ATEN, TRITON" if bad else None



class InductorBackend(Backend):
    name = "inductor"
    summary = "AOTInductor package (torch._inductor.aoti_compile_and_package), frozen weights, dynamic batch/seq"
    lower_options = (
        Option("device", str, "auto", "auto (CUDA where present), cpu or cuda[:N]"),
        Option("freezing", bool, True, "fold weights into the compiled graph"),
        Option("max_autotune", bool, None, "autotune GEMM kernels, trying Inductor's CPP GEMM template (2-3x the "
               "compile); unset: on for a CPU Program whose GEMMs read >= 1M weight elements (base-size models), "
               "except float32-activation int8; every autotuned package is checked against the Program"),
        Option("gemm_backends", str, "CPP,ATEN", "GEMM candidates max_autotune tries (CPP = Inductor's CPU GEMM template)",
               check=_check_backends),
        Option("weight_prepack", bool, True, "pack weights for oneDNN's linear (cpp.weight_prepack); off: float32 "
               "linears call MKL's GEMM on plain weights (faster for a few rows on an Intel CPU; compiled in a fresh "
               "process)"),
        Option("split_rows", int, None, "from this many rows per call (the product of the first dynamic input's "
               "dynamic dims: batch x history) run a second package of plain float32 weights (MKL's GEMM; CPU); 0: one "
               "package (also where weight_prepack is off); unset: 512 for an autotuned float32 Program, and for a "
               "base-size float32 incremental prefill, on a CPU whose MKL is not Intel's tuned one, else 0 "
               "(runtimes/inductor.py, split_rows_by_default)",
               check=lambda n: "must be >= 0" if n < 0 else None),
        Option("concat_linear", bool, False, "concatenate linears that share an input (cpp.enable_concat_linear)"),
        Option("threads", int, 0, "OpenMP threads the CPU kernels are compiled for (0: torch's count when lowering)",
               check=lambda n: "must be >= 0" if n < 0 else None),
    )
    runner_options = (
        Option("align_constants", bool, True, "CPU: move the package's weights onto 64-byte boundaries when it "
               "loads (AOTInductor leaves them 16 bytes off a cache line; bert4rec:large bf16 ran 1.12x / 1.24x "
               "faster aligned at batch 8 / 32, runtimes/inductor_constants.py); off: where AOTInductor put them"),
    )
    runner_class = InductorRunner

    def unavailable_reason(self) -> str | None:
        import torch._inductor

        if not hasattr(torch._inductor, "aoti_compile_and_package"):
            return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package"
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:  # a C++ compiler builds the package: torch runs `$CXX --version` (else g++'s) once, and caches it
            get_cpp_compiler()
        except Exception:  # torch._inductor.exc.InvalidCxxCompiler
            return f"no working C++ compiler ({os.environ.get('CXX', 'g++')} does not run); install g++ or point CXX at one"
        return None

    def versions(self) -> dict[str, str]:
        return {"backend": torch.__version__}

    def check_program(self, program: Program, options: Mapping[str, Any]) -> None:
        check_weight_zero_points(program)

    def complete_options(self, program: Program, options: Mapping[str, Any]) -> dict[str, Any]:
        # max_autotune unset: on where it pays for its compile and is right (runtimes/inductor_autotune.py)
        opts = dict(options)
        device = resolve_device(opts["device"], self.name)
        if opts["max_autotune"] is None:
            opts["max_autotune"] = autotune_by_default(program, device)
        if opts["split_rows"] is None:
            opts["split_rows"] = split_rows_by_default(program, device, opts)
        return opts

    def artifact_files(self, backend: Mapping[str, Any]) -> list[str]:
        return [backend["entry"], *([backend["split"]["entry"]] if "split" in backend else [])]

    def prefill_defaults(self, prefill: Program, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        # Autotuning picks kernels at the entry's hint sizes, here the derivation's probe (a few rows):
        # gpt-rec:base O2, history 200, batch 1 (2026-12-03, 2 threads): the autotuned prefill took
        # 12.48 ms, the plain one 8.09 (the whole model, autotuned at its own example size: 7.97 vs 8.41).
        # A prefill is many rows per call (a batch of users' histories): where MKL is not Intel's
        # tuned one, a base-size float32 prefill holds a plain-weights package for them too, as the
        # main entry does (split_rows_by_default). AMD EPYC, AVX2 only (2026-12-06, 2 threads,
        # gpt-rec:base O2 prefill over 65 events, unautotuned, interleaved, two runs): plain over packed
        # 0.84-0.96 / 1.03-1.16 / 1.10-1.22x at batch 1 / 8 / 32 (over 201: 0.90-0.93 / 1.02-1.06 / 1.00-1.07x),
        # the autotuned package 0.97 / 0.84 / 0.89x.
        # "Base-size" as the step's rule says it: where max_autotune would pay for its compile.
        device = self._device_asked(options)
        split = _plain_wins_many_rows(prefill, device) and autotune_by_default(prefill, device)
        return {"max_autotune": False, "split_rows": SPLIT_ROWS if split else 0}

    def step_defaults(self, step: Program, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        # A float32 step multiplies one row per user by each weight; which GEMM serves that fastest
        # depends on the CPU's vendor (gpt-rec:base O2, batch 1 / 8 / 32, the four lowerings timed
        # interleaved; ms at history 64):
        # - Intel Xeon with AMX (2026-12-03, benchmarks/bench_step_kernels.py): MKL's GEMM on the
        #   plain weights (weight_prepack=False), 5-10 us a call at one row, beats oneDNN's packed
        #   linear (16-25 us): plain is 1.53x / 1.17x / 1.04x the packed step, and the autotuned
        #   CPP GEMM template was 0.67 ms against plain's 0.60 at batch 1.
        # - AMD EPYC, AVX2 only (2026-12-06): MKL runs its generic code path on a non-Intel CPU
        #   (perf: 22% of the plain step in mkl_blas_def_xsgemv) and oneDNN's one-row linear is
        #   slow too: plain 1.63 / 5.02 / 9.95, packed 1.46 / 3.61 / 8.70, packed + max_autotune
        #   (Inductor's CPP GEMM template, its own AVX2 micro-kernels) 0.84 / 3.07 / 8.30; at
        #   history 200, batch 1: 1.73 / 1.76 / 1.23. gpt-rec:tiny (below max_autotune's size
        #   bar): plain 0.175, packed 0.400, autotuned 0.160, for a 3x longer compile.
        # So: plain weights where MKL is Intel's tuned one (hardware.has_fast_mkl), else the
        # autotuned template where max_autotune pays for its compile (autotune_by_default), else
        # plain. freezing=False also keeps plain weights but fuses the state copies worse (Xeon,
        # base, batch 32, history 200: 14.3 ms vs 10.7). bf16 and int8 steps keep their packed,
        # unautotuned kernels (Xeon: gpt-rec:base bf16 step 0.84 ms packed, 0.98 plain).
        # A step is a few rows: one package (split_rows=0).
        low = program_dtypes(step) & {torch.bfloat16, torch.float16}
        if low or is_quantized(step):
            return {"max_autotune": False, "split_rows": 0}
        device = self._device_asked(options)
        if device == "cpu" and not has_fast_mkl() and autotune_by_default(step, device):
            return {"max_autotune": True, "weight_prepack": True, "split_rows": 0}
        return {"max_autotune": False, "weight_prepack": False, "split_rows": 0}

    def _device_asked(self, options: Mapping[str, Any] | None) -> str:
        """The caller's ``device`` option, ``auto`` resolved (an unavailable one is refused by the lowering)."""
        device = (options or {}).get("device", "auto")
        return resolve_device(device, self.name) if device == "auto" else device

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        device = resolve_device(options["device"], self.name)
        ep = export_on(program, device)
        split = bool(options["split_rows"]) and device == "cpu" and options["weight_prepack"]  # else one package
        plain = {**options, "weight_prepack": False}
        # the plain package compiles in a fresh interpreter anyway: unautotuned, it compiles beside this
        # process's (autotuning times kernels, so an autotuned pair compiles one after the other)
        started = (FreshCompile(ep, out / "model_rows.pt2", inductor_configs(plain))
                   if split and not options["max_autotune"] else None)
        try:
            info: dict[str, Any] = {"entry": "model.pt2", "device": device,
                                    **_compile_checked(ep, out / "model.pt2", program, options, device)}
        except BaseException:
            if started is not None:
                started.cancel()
            raise
        if split:
            info["split"] = {"entry": "model_rows.pt2", "from_rows": options["split_rows"],
                             **_compile_checked(ep, out / "model_rows.pt2", program, plain, device, started)}
        return info


def split_rows_by_default(program: Program, device: str, options: Mapping[str, Any]) -> int:
    """``split_rows`` left unset: :data:`SPLIT_ROWS` for an autotuned float32 CPU Program with packed
    weights and a dynamic input where MKL is not Intel's tuned one, else 0 (one package).

    On such a CPU oneDNN's packed float32 GEMMs win for a few rows and MKL's ``sgemm`` (its Zen
    kernels) on the plain weights wins for many. AMD EPYC (Zen 3, AVX2 only), 2 threads, O2 at
    history 64, the autotuned plain package over the autotuned packed one, interleaved, two
    builds each (2026-12-06; the second ``benchmarks/bench_split_rows.py``), by rows (batch x 64):
    bert4rec:base 0.95 / 1.07x at 64 rows, 1.08 / 1.18x at 128, 1.06 / 1.21x at 256, 1.12 / 1.22x at
    512, 1.20 / 1.31x at 2048; t5-rec:base 0.93 / 0.69x, 0.90 / 0.84x, 1.04 / 0.89x, 1.25 / 1.02x,
    1.32 / 1.08x (its packed package 0.86 / 1.04x eager at 2048 rows). Autotuning picks kernels by
    timing, so builds differ; from 512 rows every build measured favoured the plain weights. The
    Intel Xeon keeps one package (MKL is Intel's tuned one there; the split is not measured on it)."""
    if not options.get("max_autotune") or not options.get("weight_prepack"):
        return 0
    return SPLIT_ROWS if _plain_wins_many_rows(program, device) else 0


def _plain_wins_many_rows(program: Program, device: str) -> bool:
    """A float32 CPU Program with a dynamic input, on a CPU whose MKL is not Intel's tuned one."""
    if device != "cpu" or has_fast_mkl():
        return False
    if program_dtypes(program) & {torch.bfloat16, torch.float16} or is_quantized(program):
        return False
    return any(spec.dynamic for spec in program.inputs)


#: rows per call (batch x history) from which an AMD float32 artifact runs its plain-weights package
SPLIT_ROWS = 512


def _compile_checked(ep: torch.export.ExportedProgram, package: Path, program: Program,
                     options: Mapping[str, Any], device: str, started: FreshCompile | None = None) -> dict[str, Any]:
    """Compile ``package`` with ``options`` (or wait for ``started``, that compile already running); an
    autotuned CPU package is checked against the Program first (:func:`package_check`) and compiled
    again as the module docstring of ``inductor_autotune`` says where it fails. The manifest keys
    saying what was compiled and why."""
    configs = inductor_configs(options)
    info: dict[str, Any] = {}
    if configs["max_autotune"] and device == "cpu" and (narrowing := narrowing_epilogues(program)):
        configs["epilogue_fusion"] = False
        info["epilogue_fusion_off"] = (
            f"autotuned with epilogue fusion off: {len(narrowing)} float linear(s) ({', '.join(narrowing[:3])}"
            f"{', ...' if len(narrowing) > 3 else ''}) reach a narrower dtype (a uint8 quantize, a bf16 cast) "
            "through elementwise ops; fused into the GEMM template's epilogue, torch 2.13 writes past that "
            "output (graphopt.runtimes.inductor_autotune)")
    if started is not None:
        started.wait()
    else:
        compile_package(ep, package, configs)
    info["inductor_configs"] = configs
    if configs["max_autotune"] and device == "cpu":
        failed, crashed, error = _check_failed(package, program)
        if failed and configs.get("epilogue_fusion", True) and (crashed or not heap_is_checked()):
            # maybe a narrowing epilogue :func:`narrowing_epilogues` does not know: autotune again without
            # fusion. Its write past the output aborts the check's interpreter where glibc's checking heap
            # is installed; there, outputs that merely differ are another template bug, and this third
            # compile would be wasted (bert4rec:tiny float32-activation int8: 124 s -> 2 compiles)
            why = f"max_autotune's package {failed}: autotuned again with epilogue fusion off"
            log.warning("inductor | %s: %s", program.name, why)
            configs = {**configs, "epilogue_fusion": False}
            compile_package(ep, package, configs)
            info.update(inductor_configs=configs, epilogue_fusion_off=why)
            failed, _, error = _check_failed(package, program)
        if failed:
            why = f"max_autotune's package {failed}: compiled again without autotuning"
            log.warning("inductor | %s: %s", program.name, why)
            configs = inductor_configs({**options, "max_autotune": False})
            compile_package(ep, package, configs)
            info.update(inductor_configs=configs, autotune_rejected=why)
        else:  # the kept package's check: its largest relative L2 error against the Program
            info["autotune_check_error"] = error
    return info


def _check_failed(package: Path, program: Program) -> tuple[str | None, bool, float]:
    """How an autotuned package failed :func:`package_check` (crashed, or off by more than
    :data:`MAX_REL_ERROR`), or None when it passed; whether it crashed; the check's error."""
    error, died = package_check(package, program)
    if died is not None:
        return f"crashed on the Program's sample inputs, {died}", True, error
    if not error <= MAX_REL_ERROR:  # NaN too
        why = f"differed from the Program by {error:.3g} (relative L2 on its sample inputs, > {MAX_REL_ERROR})"
        return why, False, error
    return None, False, error


def inductor_configs(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``torch._inductor.config`` keys a set of lowering options means."""
    configs: dict[str, Any] = {"freezing": options["freezing"], "max_autotune": options["max_autotune"]}
    if options["max_autotune"]:
        configs["max_autotune_gemm_backends"] = options["gemm_backends"]
        if not os.environ.get("GRAPHOPT_DEBUG"):
            configs["autotune_num_choices_displayed"] = 0  # no timing table per GEMM shape on stderr
            configs["max_autotune_report_choices_stats"] = False  # nor its JSON summary
    if options["concat_linear"]:
        configs["cpp.enable_concat_linear"] = True
    if not options["weight_prepack"]:
        configs["cpp.weight_prepack"] = False
    # the CPU kernels' `omp parallel num_threads(N)` is fixed at compile time: record N
    configs["cpp.threads"] = options["threads"] or torch.get_num_threads()
    return configs


BACKEND = InductorBackend()
