"""graphopt.hardware: CPU model and flags, and the int8 dot-product decision."""

from __future__ import annotations

from graphopt import hardware


def test_flags_and_model_are_read():
    assert hardware.cpu_model()
    flags = hardware.cpu_flags()
    assert flags, "no CPU flags read"
    assert hardware.reported_flags() == [f for f in hardware.REPORTED_FLAGS if f in flags]


def test_model_names_the_family_and_model_the_file_lists():
    """Two CPUs share the name ``AMD EPYC`` here (AVX2 only; Zen 4 with avx512_bf16): every figure
    records ``family F model M`` with the name, as /proc/cpuinfo lists them for the first processor."""
    with open("/proc/cpuinfo") as f:
        fields = [ln.split(":", 1) for ln in f if ":" in ln]
    first = {}
    for key, value in fields:
        first.setdefault(key.strip(), value.strip())
    if "cpu family" not in first or "model" not in first or "model name" not in first:  # not an x86 listing
        assert hardware.cpu_family_model() in ("", f"family {first.get('cpu family')} model {first.get('model')}")
        return
    fm = f"family {first['cpu family']} model {first['model']}"
    assert hardware.cpu_family_model() == fm
    assert hardware.cpu_model() == f"{first['model name']} ({fm})"


def test_int8_dot_follows_flags_and_onednn_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    expected = any(f in hardware.cpu_flags() for f in hardware.INT8_DOT_FLAGS)
    assert hardware.has_int8_dot() is expected
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.has_int8_dot() is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert hardware.has_int8_dot() is expected


def test_fast_mkl_only_on_intel(monkeypatch):
    """MKL's tuned BLAS kernels are Intel's: the float32 step lowering keys on it."""
    import torch

    vendor = hardware.cpu_vendor()
    with open("/proc/cpuinfo") as f:
        listed = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("vendor_id")]
    assert vendor == (listed[0] if listed else vendor)
    assert hardware.has_fast_mkl() is (torch.backends.mkl.is_available() and vendor == "GenuineIntel")
    monkeypatch.setattr(hardware, "cpu_vendor", lambda: "AuthenticAMD")
    assert hardware.has_fast_mkl() is False
    monkeypatch.setattr(hardware, "cpu_vendor", lambda: "GenuineIntel")
    assert hardware.has_fast_mkl() is torch.backends.mkl.is_available()
