"""This process: its memory (RSS readers, the heap policy) and third-party noise
(warnings, chatty loggers).

One place for both, so the runtimes, the harness, the stages workers and the
CLI read memory the same way and silence the same things.

The heap policy (:func:`keep_freed_memory`): with glibc's default malloc a
serving process gives the large intermediate buffers of each call back to the
kernel (``mmap``/heap trimming) and page-faults them in again on the next call.
bert4rec:base at batch 32 (AMX Xeon, 2 threads, 2026-12-04, ``benchmarks/bench_heap.py``):
an AOTInductor bf16 package 16.3 ms and 2,336 minor page faults per call with
glibc's default, 12.5 ms and 33 with freed memory kept; torch.compile-bf16 18.1 ->
13.3 ms (4,029 -> 0 faults); eager fp32 71.8 -> 57.7 ms. jemalloc/tcmalloc under
``LD_PRELOAD`` do the same; this is the glibc setting, made when a runner
activates and before the harness or the tuner time anything, so every variant
of a run, eager and the peers included, runs under one policy.
``GRAPHOPT_KEEP_HEAP=0``, or the process's own malloc settings (``MALLOC_*``,
``GLIBC_TUNABLES``, a jemalloc/tcmalloc ``LD_PRELOAD``), leave it as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["rss_kb", "reset_peak_rss", "keep_freed_memory", "heap_policy", "quiet_backends", "quiet_third_party",
           "NOISY_LOGGERS"]

#: loggers of libraries graphopt drives that print progress or benign warnings
NOISY_LOGGERS = (
    "torch.onnx",
    "torch._export",
    "torch.export",
    "torch._dynamo",
    "torch._inductor",
    "torch.fx.experimental.symbolic_shapes",
    "torch.utils._pytree",
    "torch.utils.cpp_extension",  # "No CUDA runtime is found" when Inductor compiles C++ on a CPU machine
    "torchao",
    "onnxscript",
    "onnx_ir",
    "onnxslim",
)

_WARNINGS = (
    {"category": DeprecationWarning},
    {"category": FutureWarning},
    {"message": ".*TorchScript.*"},
    {"message": ".*torch.jit.*"},
    {"message": "No complete tensor found"},  # torch.export.save of shared buffers
    {"message": "To copy construct from a tensor"},  # Inductor's int8 autotuning (mkldnn_lowerings)
    {"message": "TypedStorage is deprecated"},  # Inductor's autotuning (select_algorithm)
)


# ------------------------------------------------------------------ memory
def rss_kb() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in KiB (``/proc/self/status``;
    elsewhere both are the peak from ``getrusage``)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak, peak
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return fields.get("VmRSS", peak), peak


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) so peaks count from now;
    False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap, not their own mapping (glibc's cap on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap kept for reuse, up to this much
TRIM_THRESHOLD = 1 << 30
_heap: str | None = None  # the policy in force once decided: "kept", "default" or why it was left


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse in this process (mmap threshold
    :data:`MMAP_THRESHOLD`, trim threshold :data:`TRIM_THRESHOLD`; module docstring):
    True when in force. Decided once per process; a no-op elsewhere than Linux with
    glibc, with ``GRAPHOPT_KEEP_HEAP=0``, or where the process sets malloc itself."""
    global _heap
    if _heap is None:
        if os.environ.get("GRAPHOPT_KEEP_HEAP", "1") == "0":
            _heap = "default (GRAPHOPT_KEEP_HEAP=0)"
        elif any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", "") \
                or "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc/tcmalloc (libtcmalloc.so, libjemalloc.so)
            _heap = "the process's own malloc settings (MALLOC_*, GLIBC_TUNABLES or LD_PRELOAD)"
        elif not sys.platform.startswith("linux"):
            _heap = "default (not Linux)"
        else:
            try:
                mallopt = ctypes.CDLL(None).mallopt  # this process's symbols: glibc's where glibc is linked
                kept = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                _heap = "kept" if kept else "default (mallopt refused)"
            except (OSError, AttributeError):  # musl and others: no mallopt
                _heap = "default (no glibc mallopt)"
    return _heap == "kept"


def heap_policy() -> str:
    """What the benchmark reports: ``"freed memory kept (glibc mallopt: ...)"`` or why not."""
    if _heap == "kept":
        return f"freed memory kept (glibc mallopt: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold " \
               f"{TRIM_THRESHOLD >> 20} MiB)"
    return _heap or "default (not set)"


# ------------------------------------------------------------------- noise
def _silence() -> None:
    for kwargs in _WARNINGS:
        warnings.filterwarnings("ignore", **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def quiet_backends() -> Iterator[None]:
    """Silence third-party warnings and chatty loggers (TorchScript deprecation,
    torch.onnx progress, onnxscript constant folding) for the duration;
    ``GRAPHOPT_DEBUG=1`` keeps them."""
    debug = bool(os.environ.get("GRAPHOPT_DEBUG"))
    saved = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    try:
        with warnings.catch_warnings():
            if not debug:
                for name in NOISY_LOGGERS:
                    logging.getLogger(name).setLevel(logging.ERROR)
                _silence()
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def quiet_third_party() -> None:
    """The same silencing for the whole process (the CLI and benchmark scripts)."""
    _silence()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
