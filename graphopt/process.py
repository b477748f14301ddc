"""This process: its memory (RSS readers) and third-party noise (warnings, chatty loggers).

One place for both, so the runtimes, the harness, the stages workers and the
CLI read memory the same way and silence the same things.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["rss_kb", "reset_peak_rss", "quiet_backends", "quiet_third_party", "NOISY_LOGGERS"]

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
