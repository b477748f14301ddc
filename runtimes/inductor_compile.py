"""Compile an ExportedProgram into an AOTInductor package, here or in a fresh interpreter.

Some Inductor settings are process-wide in fact, whatever ``inductor_configs``
says: the freezing passes register oneDNN's weight-packing patterns once per
process, on the first frozen compile, so ``cpp.weight_prepack=False`` is ignored
after it (and a first compile with it off leaves every later one in the process
unpacked). :func:`compile_package` therefore compiles a package with
``cpp.weight_prepack=False`` in a fresh interpreter (``python -m
graphopt.runtimes.inductor_compile EP PACKAGE CONFIGS``, the program passed
through ``torch.export.save``); every other compile runs in this process.
:class:`FreshCompile` starts such a compile and returns at once, so that a
caller can compile another package here meanwhile (one core each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["FreshCompile", "compile_package", "needs_fresh_process"]

#: how long a compile in a fresh interpreter may take (a large model's takes minutes)
TIMEOUT_S = 3600


def needs_fresh_process(configs: Mapping[str, Any]) -> bool:
    """Whether ``configs`` only take effect in an interpreter that has compiled nothing yet."""
    return configs.get("cpp.weight_prepack", True) is False


def _compile_here(ep: torch.export.ExportedProgram, package: Path, configs: Mapping[str, Any]) -> None:
    import torch._inductor

    # Inductor freezes only when grad is off (compile_fx checks torch.is_grad_enabled()): without
    # no_grad "freezing" is silently ignored, weights stay graph inputs, and int8 weights are
    # dequantized on every call instead of prepacked for oneDNN's qlinear
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(ep, package_path=str(package), inductor_configs=dict(configs))


def compile_package(ep: torch.export.ExportedProgram, package: Path, configs: Mapping[str, Any]) -> None:
    """``aoti_compile_and_package(ep, package, configs)`` under ``no_grad``; in a fresh
    interpreter when :func:`needs_fresh_process` (its error's last line is raised)."""
    if not needs_fresh_process(configs):
        _compile_here(ep, package, configs)
        return
    FreshCompile(ep, package, configs).wait()


class FreshCompile:
    """Start compiling ``package`` in a fresh interpreter and return at once: :meth:`wait` for it
    (its error's last line is raised), or :meth:`cancel` it (the process is killed)."""

    def __init__(self, ep: torch.export.ExportedProgram, package: Path, configs: Mapping[str, Any]) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="graphopt-aoti-")
        saved = Path(self._tmp.name) / "program.pt2"
        torch.export.save(ep, saved)
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        if not configs.get("cpp.weight_prepack", True):
            env["TORCHINDUCTOR_CPP_WEIGHT_PREPACK"] = "0"
        cmd = [sys.executable, "-m", "graphopt.runtimes.inductor_compile", str(saved), str(package),
               json.dumps(dict(configs))]
        # stderr to a file, not a pipe: a pipe nobody reads while this process compiles would stall the child
        self._stderr = open(Path(self._tmp.name) / "stderr.txt", "w+")
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)

    def wait(self) -> None:
        try:
            self._proc.wait(timeout=TIMEOUT_S)
            self._stderr.seek(0)
            err = self._stderr.read()
        except subprocess.TimeoutExpired:
            self.cancel()
            raise RuntimeError(f"compiling in a fresh interpreter took over {TIMEOUT_S} s") from None
        finally:
            self._close()
        if self._proc.returncode != 0:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            if os.environ.get("GRAPHOPT_DEBUG"):
                sys.stderr.write(err)  # the fresh interpreter's whole traceback
            raise RuntimeError(f"compiling in a fresh interpreter failed: {lines[-1] if lines else f'rc {self._proc.returncode}'}")

    def cancel(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def _close(self) -> None:
        self._stderr.close()
        self._tmp.cleanup()


def _main(argv: list[str]) -> int:
    saved, package, configs = argv
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    _compile_here(torch.export.load(saved), Path(package), json.loads(configs))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
