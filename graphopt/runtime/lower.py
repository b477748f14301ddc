"""Lower once, load many times: ``lower(program, runtime, dir)`` writes an
artifact atomically; ``load(dir)`` checks it and returns its Runner."""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import GraphoptError, LoweringError, RunnerError, first_line
from graphopt.ir.program import Program
from graphopt.options import resolve_options
from graphopt.outputs import atomic_directory
from graphopt.process import quiet_backends
from graphopt.runtime.artifact import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    Artifact,
    read_artifact,
    sha256_file,
    write_manifest,
)
from graphopt.runtime.backend import Backend, check_state, get_runtime, require_available
from graphopt.runtime.contract import dim_ranges
from graphopt.runtime.index_ranges import index_ranges
from graphopt.runtime.runner import Runner

__all__ = ["lower", "load"]

log = logging.getLogger(__name__)


def _versions(backend: Backend) -> dict[str, str]:
    import graphopt

    return {"graphopt": graphopt.__version__, "torch": torch.__version__, **backend.versions()}


def lower_entry(backend: Backend, program: Program, folder: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """``backend.lower_into(program, folder, opts)`` with its failures as one-line
    ``LoweringError`` s (the traceback under ``GRAPHOPT_DEBUG``); checks the entry file exists."""
    try:
        info = backend.lower_into(program, folder, opts)
    except GraphoptError:
        raise
    except Exception as e:  # backend exporters raise many unrelated types
        if os.environ.get("GRAPHOPT_DEBUG"):
            raise
        raise LoweringError(
            f"{backend.name} | lowering {program.name} failed: {first_line(e, with_type=True)}; "
            "set GRAPHOPT_DEBUG=1 (or --debug) for the traceback"
        ) from e
    if "entry" not in info or not (folder / info["entry"]).is_file():
        raise LoweringError(f"{backend.name} | lowering {program.name} wrote no entry file ({info.get('entry')!r})")
    return info


def file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` but the manifest: relative path -> sha256 and size."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel != MANIFEST_FILE:
            files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return files


def manifest_head(program: Program, backend: Backend, opts: dict[str, Any]) -> dict[str, Any]:
    """The manifest keys every artifact has, before its ``backend`` section and files."""
    return {
        "format": MANIFEST_FORMAT,
        "runtime": backend.name,
        "model": program.name,
        "source": program.meta.get("zoo") or program.meta.get("hf_directory") or program.name,
        "pipeline": program.pipeline,
        "inputs": [s.to_json() for s in program.inputs],
        "outputs": list(program.output_names),
        "dims": dim_ranges(program),
        "index_ranges": index_ranges(program),
        "options": dict(opts),
        "versions": _versions(backend),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def lower(
    program: Program,
    runtime: str,
    out_dir: str | os.PathLike[str],
    force: bool = False,
    **options: Any,
) -> Artifact:
    """Lower ``program`` with ``runtime`` into the directory ``out_dir`` (atomic).

    ``options`` are the runtime's lowering options (``graphopt runtimes``
    lists them); unknown ones are an error. Refuses an existing ``out_dir``
    unless ``force``.
    """
    if not isinstance(program, Program):
        raise LoweringError(f"lower takes a Program, got {type(program).__name__}; capture the model first")
    backend = get_runtime(runtime)
    runtime = backend.name  # the current name, for a renamed runtime's old one
    require_available(backend)
    opts = backend.complete_options(program, resolve_options(backend.lower_options, options, f"{runtime} | lower",
                                                             LoweringError))
    backend.check_program(program, opts)
    check_state(backend, program)
    with atomic_directory(out_dir, force=force) as tmp, quiet_backends():
        info = lower_entry(backend, program, tmp, opts)
        files = file_checksums(tmp)
        manifest = {**manifest_head(program, backend, opts), "backend": info, "files": files}
        manifest = write_manifest(tmp, manifest)
    log.info("lowered %s with %s into %s (%d files)", program.name, runtime, out_dir, len(files))
    return Artifact(Path(out_dir), manifest)


def load(out_dir: str | os.PathLike[str], *, verify: bool = True, **options: Any) -> Runner:
    """Check the artifact in ``out_dir`` and return an (inactive) Runner for it.

    ``options`` are the runtime's runner options (threads, providers...).
    Nothing is deserialized before the manifest, the paths it names and every
    file's size and sha256 are checked (:func:`read_artifact`); ``verify=False``
    skips only the sha256 (missing, unlisted or resized files are still refused); a
    damaged file then reaches the backend: measured, a flipped byte crashed the
    process (AOTInductor, SIGSEGV) or returned wrong scores (TorchScript, ONNX
    Runtime weights).
    """
    artifact = read_artifact(out_dir, verify=verify)  # manifest, paths, sizes, checksums; unknown runtime
    backend = get_runtime(artifact.runtime)
    require_available(backend)
    written = artifact.manifest.get("versions", {}).get("torch")
    if written and written != torch.__version__ and artifact.runtime in ("inductor", "torchscript"):
        log.warning("%s was lowered with torch %s, running with %s", artifact.path, written, torch.__version__)
    opts = resolve_options(backend.runner_options, options, f"{artifact.runtime} | load", RunnerError)
    return backend.make_runner(artifact, opts)
