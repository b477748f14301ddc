"""Crash reproducers (MLIR's ``--mlir-pass-pipeline-crash-reproducer``).

When a pass fails under ``PassManager(..., reproducer_dir=DIR)`` (``graphopt
optimize --reproducer DIR``), DIR gets what is needed to fail the same way
again:

* ``input.pt2``: the Program as the failing pass received it, and
  ``pipeline.txt``: the failing step, canonical (every option spelled out);
* ``original.pt2``: the Program the whole pipeline started from;
* ``data.pt``: the example inputs verify-each ran, the calibration batches
  and torch's RNG state at the start of the pipeline and of the failing pass;
* ``reproducer.json``: the full pipeline, the passes before, the error, the
  seed, whether verify-each was on, graphopt/torch/python/CPU versions, and
  the module that registered each pass graphopt does not ship (``pass_modules``).

A pipeline with your own passes re-runs with ``graphopt reproduce DIR --import
MODULE`` (the command the failure prints names the modules): the module must be
importable (its folder on PYTHONPATH). A re-run never imports a module on its
own: a reproducer names modules, it does not choose what code runs. A pass
registered in ``__main__`` (a script or notebook) must move into a module first.

``graphopt reproduce DIR`` (:func:`rerun`) runs the failing step again on
``input.pt2`` with the same data, RNG state and instruments and raises the
same :class:`PassFailedError` (same pass, same message). A saved Program is
a re-export of the in-memory one (it may hold dead ``getitem`` nodes the
in-memory graph had not), so a failure that depends on the exact graph may
not show on ``input.pt2``; then :func:`rerun` runs the whole pipeline from
``original.pt2`` as well. DIR is written atomically and replaces only an
earlier reproducer (graphopt.outputs rules).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import ArtifactError, PipelineParseError, first_line
from graphopt.outputs import atomic_directory, check_replaceable, marker_kind

__all__ = ["check_reproducer_dir", "save_reproducer", "rerun", "rerun_command", "import_modules", "REPRODUCER_FILE"]

log = logging.getLogger(__name__)

REPRODUCER_FILE = "reproducer.json"
_FORMAT = "graphopt.reproducer/1"


def check_reproducer_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The folder a reproducer may be written to: absent, empty, or an earlier reproducer (replaced
    without asking, as each failure writes a new one); anything else, an optimize or bench output
    included, is refused, so a failure never costs the user an output. Returns the path."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and marker_kind(out) != "reproducer":
        raise ArtifactError(f"--reproducer {out} holds something other than an earlier reproducer; "
                            "pick a new folder for --reproducer")
    check_replaceable(out, force=True, flag=None)  # a file, '.', a user's files added to a reproducer
    return out


def save_reproducer(
    out_dir: str | os.PathLike[str],
    start: tuple[Any, torch.Tensor],
    before: tuple[Any, torch.Tensor],
    step: str,
    pipeline: str,
    ctx: Any,
    verify_each: bool,
    error: BaseException,
    modules: Mapping[str, str] | None = None,
) -> Path:
    """Write a reproducer: ``start`` and ``before`` are (Program, RNG state) at the start
    of the pipeline and before the failing ``step``."""
    import graphopt
    from graphopt.hardware import cpu_model

    out = check_reproducer_dir(out_dir)
    with atomic_directory(out, force=True, kind="reproducer") as tmp:
        before[0].save(tmp / "input.pt2")
        start[0].save(tmp / "original.pt2")
        torch.save(
            {
                "example_inputs": ctx.example_inputs,
                "calibration_data": ctx.calibration_batches() or None,
                "rng_state": before[1],
                "rng_state_start": start[1],
            },
            tmp / "data.pt",
        )
        (tmp / "pipeline.txt").write_text(step + "\n")
        meta = {
            "format": _FORMAT,
            "failing_pass": step,
            "pipeline": pipeline,
            "passes_before": list(ctx.passes_run),
            "seed": ctx.seed,
            "verify_each": verify_each,
            "error": f"{type(error).__name__}: {first_line(error, with_type=False)}",
            "versions": {
                "graphopt": graphopt.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "cpu": cpu_model(),
            },
            "pass_modules": {
                name: {"module": mod, "file": getattr(sys.modules.get(mod), "__file__", None)}
                for name, mod in sorted((modules or {}).items())
            },
            "rerun": rerun_command(out, modules or {}),
            "rerun_without_data": f"graphopt optimize {out / 'input.pt2'} -p \"$(cat {out / 'pipeline.txt'})\" -o OUT",
        }
        (tmp / REPRODUCER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def rerun_command(out: str | os.PathLike[str], modules: Mapping[str, str]) -> str:
    """``graphopt reproduce DIR``, with ``--import MODULE`` for each module that registered a pass."""
    imports = "".join(f" --import {m}" for m in sorted(set(modules.values())) if m != "__main__")
    return f"graphopt reproduce {out}{imports}"


def import_modules(names: Iterable[str]) -> None:
    """Import the modules that register your passes (``--import MODULE``)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise PipelineParseError(
                f"--import {name}: {first_line(e, with_type=True)}; put the folder that holds it on PYTHONPATH"
            ) from None


def _check_passes_loaded(d: Path, meta: dict[str, Any]) -> None:
    from graphopt.transform.base import available_passes

    known = available_passes()
    for name, where in sorted((meta.get("pass_modules") or {}).items()):
        if name in known:
            continue
        mod = where.get("module") if isinstance(where, dict) else where
        if mod == "__main__":
            raise PipelineParseError(
                f"reproducer {d} runs pass '{name}', registered by the script or notebook that failed (__main__), "
                "which a re-run cannot import; move the pass into a module and re-run with --import MODULE"
            )
        file = where.get("file") if isinstance(where, dict) else None
        raise PipelineParseError(
            f"reproducer {d} runs pass '{name}' from module '{mod}'{f' ({file})' if file else ''}; "
            f"re-run with --import {mod}, its folder on PYTHONPATH"
        )


def _read(d: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        meta = json.loads((d / REPRODUCER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{d} is not a graphopt reproducer ({first_line(e, with_type=True)}); "
                            "write one with `graphopt optimize --reproducer DIR`") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != _FORMAT:
        raise ArtifactError(f"{d}/{REPRODUCER_FILE} has format {fmt!r}, this graphopt reads {_FORMAT!r}")
    try:
        data = torch.load(d / "data.pt", weights_only=True)
    except Exception as e:  # torch.load raises many types for a damaged file
        raise ArtifactError(f"{d}/data.pt is unreadable ({first_line(e, with_type=True)}); "
                            "save the reproducer again") from None
    return meta, data


def rerun(repro_dir: str | os.PathLike[str], imports: Iterable[str] = ()) -> tuple[Any, dict[str, Any]]:
    """Run a reproducer's failing step again (then, if it passes, the whole pipeline from the
    original input); raises the PassFailedError when the failure reproduces, else returns
    the Program the step produced and the reproducer's metadata. ``imports``: modules that
    register the pipeline's own passes, imported first."""
    from graphopt.ir.program import Program
    from graphopt.transform.manager import PassContext, PassManager

    d = Path(repro_dir)
    meta, data = _read(d)
    import_modules(imports)
    _check_passes_loaded(d, meta)
    verify = bool(meta.get("verify_each"))

    def context(passes_before: list[str]) -> PassContext:
        return PassContext(example_inputs=data.get("example_inputs"), calibration_data=data.get("calibration_data"),
                           seed=int(meta.get("seed", 0)), passes_run=passes_before)

    pm = PassManager((d / "pipeline.txt").read_text().strip(), verify_each=verify)
    torch.set_rng_state(data["rng_state"])
    result, _ = pm.run(Program.load(d / "input.pt2"), context(list(meta.get("passes_before", []))))
    if (d / "original.pt2").is_file() and meta.get("passes_before"):
        log.info("reproducer %s: the step passed on input.pt2; running the whole pipeline", d)
        torch.set_rng_state(data["rng_state_start"])
        PassManager(meta["pipeline"], verify_each=verify).run(Program.load(d / "original.pt2"), context([]))
    log.info("reproducer %s: %s ran without failing", d, meta.get("failing_pass"))
    return result, meta
