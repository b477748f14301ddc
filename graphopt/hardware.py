"""What this CPU can do: the facts passes decide on and every benchmark figure records.

Read from ``/proc/cpuinfo`` (Linux); elsewhere from torch's own CPU probes.
The int8 question matters for correctness, not only speed: without a VNNI or
AMX int8 dot product, x86 int8 GEMMs (ONNX Runtime's MLAS, oneDNN) multiply
uint8 activations by int8 weights with ``vpmaddubsw``, which adds each pair of
products into a *saturating* int16. 255 * 127 * 2 overflows int16; with 7-bit
weights (|w| <= 64) the pair sum (<= 32640) fits. ``quantize-int8`` and
``quantize-int8-dynamic`` therefore use 7-bit weights on such CPUs
(``reduce_range=auto``), as ONNX Runtime's ``reduce_range`` and PyTorch's x86
observers do.
"""

from __future__ import annotations

import functools
import os
import platform

__all__ = ["INT8_DOT_FLAGS", "REPORTED_FLAGS", "cpu_family_model", "cpu_flags", "cpu_model", "cpu_vendor",
           "has_bf16_kernels", "has_fast_mkl", "has_int8_dot", "reported_flags"]

#: any of these gives a non-saturating u8 x s8 dot product (VNNI, AVX-VNNI, AMX int8 tiles)
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: the flags recorded with every figure (low-precision matrix units)
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")

#: oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) values that still include an int8 dot product
_ONEDNN_INT8_DOT = ("VNNI", "BF16", "AMX", "AVX10", "ALL", "DEFAULT")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str], str, str]:
    """The first processor's model name, flags, vendor id and ``family F model M`` (``/proc/cpuinfo``)."""
    model, flags, vendor, family, number = "", frozenset(), "", "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                elif key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "cpu family" and not family:
                    family = value.strip()
                elif key == "model" and not number:
                    number = value.strip()
                if model and flags and vendor and family and number:
                    break
    except OSError:
        pass
    return model, flags, vendor, f"family {family} model {number}" if family and number else ""


def cpu_model() -> str:
    """The CPU's model name and :func:`cpu_family_model` (``AMD EPYC (family 25 model 17)``,
    ``/proc/cpuinfo``), else what ``platform`` knows."""
    name, fm = _cpuinfo()[0], _cpuinfo()[3]
    if name:
        return f"{name} ({fm})" if fm else name
    return platform.processor() or platform.machine()


def cpu_family_model() -> str:
    """``family F model M`` of ``/proc/cpuinfo`` (``""`` where it is not there): what tells CPUs
    with the same model name apart (two ``AMD EPYC`` kinds were lent here: one with AVX2 only, and
    a Zen 4, family 25 model 17, with avx512_bf16 and VNNI), so it is recorded with every figure."""
    return _cpuinfo()[3]


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``; ``/proc/cpuinfo``), else the one
    ``platform.processor()`` names, else ``""``."""
    vendor = _cpuinfo()[2]
    if vendor:
        return vendor
    known = ("GenuineIntel", "AuthenticAMD")
    return next((v for v in known if v in platform.processor()), "")


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags (``/proc/cpuinfo`` spelling); from torch's probes off Linux."""
    flags = _cpuinfo()[1]
    if flags:
        return flags
    import torch

    probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "avx512_vnni": "_is_vnni_supported",
              "amx_tile": "_is_amx_tile_supported"}
    return frozenset(flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)())


def reported_flags() -> list[str]:
    """The low-precision flags of :data:`REPORTED_FLAGS` this CPU has, in that order."""
    have = cpu_flags()
    return [f for f in REPORTED_FLAGS if f in have]


def has_int8_dot() -> bool:
    """Whether int8 GEMMs here accumulate u8 x s8 products without int16 saturation.

    True when the CPU has VNNI, AVX-VNNI or AMX int8, unless ``ONEDNN_MAX_CPU_ISA``
    caps oneDNN below them (then oneDNN's int8 kernels saturate like any
    pre-VNNI CPU's, and the cap is the way to check that path on a newer CPU).
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not any(k in cap for k in _ONEDNN_INT8_DOT):
        return False
    return any(f in cpu_flags() for f in INT8_DOT_FLAGS)


def has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 GEMM kernels for this CPU (avx512 or avx_ne_convert and up; AMX
    natively). Without them (an AVX2-only CPU) its bf16 and int8-mixed-bf16 primitives run
    reference code: bert4rec:base's int8-mixed-bf16 package took 1967 ms at batch 32 where
    eager fp32 took 101 ms and the fp32-form int8 package 47 ms (AMD EPYC, AVX2 only, 2026-12-05).
    """
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def has_fast_mkl() -> bool:
    """Whether torch's MKL BLAS runs its tuned kernels here: on Intel CPUs. Elsewhere MKL
    dispatches to its generic ``def`` code path: gpt-rec:base's float32 incremental step on
    plain weights (16 one-row GEMMs through MKL) spent 22% of its time in
    ``mkl_blas_def_xsgemv`` and ran 1.95x slower than Inductor's CPP GEMM template on an AMD
    EPYC with AVX2 (``perf record``, 2026-12-06), where on an Intel Xeon it is the fastest
    step lowering (``InductorBackend.step_defaults``).
    """
    import torch

    return bool(torch.backends.mkl.is_available() and cpu_vendor() == "GenuineIntel")
