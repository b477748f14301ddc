"""Lower a Program to a backend artifact on disk, load it back as a Runner.

Lower once, load many times (Polygraphy's loader/runner split)::

    artifact = graphopt.lower(program, "onnxruntime", "out/ort")
    with graphopt.load("out/ort") as runner:
        (scores,) = runner(input_ids, attention_mask)

An artifact directory holds the backend's model file(s) and ``manifest.json``
(:data:`MANIFEST_FORMAT`): runtime, input names/dtypes/dynamic dims, output
names, the canonical pipeline and source model, graphopt/torch/backend
versions, lowering options and a sha256 checksum per file. ``load`` refuses a
directory whose manifest is missing, of another format, or whose files are
missing or changed.

Each runtime is a module ``graphopt.runtimes.<name>`` exposing ``BACKEND``
(a :class:`Backend`); it is imported only when first used, so a missing
optional package (onnxruntime, tensorrt) only disables that runtime.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from graphopt.errors import (
    ArtifactError,
    BackendUnavailableError,
    GraphoptError,
    LoweringError,
    RunnerError,
    first_line,
)
from graphopt.ir.program import InputSpec, Program, bind_inputs, check_inputs
from graphopt.outputs import atomic_directory
from graphopt.process import quiet_backends

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_FILE",
    "RuntimeOption",
    "Backend",
    "Runner",
    "Artifact",
    "RuntimeStatus",
    "lower",
    "load",
    "read_artifact",
    "available_runtimes",
    "runtime_names",
    "get_runtime",
    "register_runtime",
    "program_dtypes",
    "dim_ranges",
    "is_quantized",
    "resolve_device",
    "sha256_file",
]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "graphopt.artifact/1"
MANIFEST_FILE = "manifest.json"

#: built-in runtimes -> module under graphopt.runtimes (imported lazily)
_BUILTIN: dict[str, str] = {
    "eager": "eager",
    "torchscript": "torchscript",
    "onnxruntime": "onnxruntime",
    "inductor": "inductor",
    "tensorrt": "tensorrt",
    "pipeline": "pipeline",
}
_REGISTRY: dict[str, Backend] = {}

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def program_dtypes(program: Program) -> set[torch.dtype]:
    """Every tensor dtype the Program holds or computes (weights and node values)."""
    dtypes = {t.dtype for t in program.parameter_tensors().values()}
    for node in program.graph.nodes:
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else (val,)
        dtypes.update(v.dtype for v in vals if isinstance(v, torch.Tensor))
    return dtypes


def is_quantized(program: Program) -> bool:
    """True when the graph holds quantize/dequantize ops (QDQ int8)."""
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        namespace = getattr(node.target, "namespace", "")
        if namespace == "quantized_decomposed" or "quantize" in str(node.target):
            return True
    return False


def resolve_device(device: str, runtime: str) -> str:
    """``auto`` -> ``cuda`` where a CUDA device is present, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"{runtime} | device {device!r} asked for, but no CUDA device is visible")
    if device != "cpu" and not device.startswith("cuda"):
        raise LoweringError(f"{runtime} | device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def _finite_int(value: Any) -> int | None:
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return v if abs(v) < 2**62 else None


def dim_ranges(program: Program) -> dict[str, dict[str, int | None]]:
    """Per dynamic label, the [min, max] torch.export proved (max None = unbounded)."""
    out: dict[str, dict[str, int | None]] = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for spec, ph in zip(program.inputs, placeholders):
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for dim, label in spec.dynamic.items():
            size = val.shape[dim] if dim < val.dim() else None
            if not isinstance(size, torch.SymInt):
                continue
            try:
                vr = size.node.shape_env.var_to_range.get(size.node.expr)
            except AttributeError:
                vr = None
            if vr is None:
                continue
            # torch.export reports min 2 for dims it refused to specialize at 0/1;
            # the lowered graphs are shape-generic and are tested at 1 too
            lo = _finite_int(vr.lower) or 1
            lo = 1 if lo <= 2 else lo
            hi = _finite_int(vr.upper)
            cur = out.setdefault(label, {"min": lo, "max": hi})
            cur["min"] = max(cur["min"] or 0, lo)
            if hi is not None:
                cur["max"] = hi if cur["max"] is None else min(cur["max"], hi)
    return out


# --------------------------------------------------------------------- options
@dataclass(frozen=True)
class RuntimeOption:
    """One typed lowering or runner option of a runtime."""

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None

    def coerce(self, value: Any, where: str, error: type[GraphoptError] = LoweringError) -> Any:
        if value is None:
            return None
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                typed: Any = value.lower() in ("true", "1", "yes", "on")
            elif self.type is list:
                typed = [v for v in value.split(",") if v] if isinstance(value, str) else list(value)
            elif self.type is bool:
                if not isinstance(value, bool):
                    raise TypeError(value)
                typed = value
            else:
                typed = self.type(value)
        except (TypeError, ValueError):
            raise error(
                f"{where} option '{self.name}': expected {self.type.__name__}, got {value!r}"
            ) from None
        if self.choices is not None and typed not in self.choices:
            raise error(
                f"{where} option '{self.name}': {typed!r} is not one of "
                f"{', '.join(map(str, self.choices))}"
            )
        return typed


def _resolve_options(
    declared: Sequence[RuntimeOption], given: Mapping[str, Any], where: str, error: type[GraphoptError]
) -> dict[str, Any]:
    known = {o.name: o for o in declared}
    for key in given:
        if key not in known:
            names = ", ".join(known) or "none"
            raise error(f"{where}: unknown option '{key}'; options: {names}")
    return {name: opt.coerce(given.get(name, opt.default), where, error) for name, opt in known.items()}


# ---------------------------------------------------------------------- runner
class Runner:
    """Runs one loaded artifact. Use as a context manager (Polygraphy's BaseRunner)::

        with graphopt.load("out/ort") as runner:
            outputs = runner(input_ids, attention_mask)     # tuple, program order
            named = runner.infer({"input_ids": ids, ...})   # dict by output name

    Public methods check that the runner is active and validate input names,
    dtypes and ranks against the manifest, then call the subclass's
    ``_activate_impl`` / ``_infer_impl`` / ``_deactivate_impl``. Every
    message starts with the runtime's name.
    """

    #: runtime name, e.g. ``onnxruntime``
    name: ClassVar[str] = "runner"

    def __init__(self, artifact: Artifact | None, inputs: Sequence[InputSpec], output_names: Sequence[str],
                 **options: Any):
        self.artifact = artifact
        self.inputs = list(inputs)
        self.output_names = list(output_names)
        self.options = dict(options)
        self.device = "cpu"
        self.is_active = False

    # ------------------------------------------------------------- lifecycle
    def activate(self) -> Runner:
        if self.is_active:
            raise RunnerError(f"{self.name} | runner is already active; deactivate() it first")
        try:
            with quiet_backends():
                self._activate_impl()
        except GraphoptError:
            raise
        except Exception as e:  # backend loaders raise many unrelated types
            where = self.artifact.path if self.artifact else "program"
            raise RunnerError(f"{self.name} | could not load {where}: {first_line(e, with_type=False)}") from e
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if not self.is_active:
            raise RunnerError(f"{self.name} | runner is not active; nothing to deactivate")
        try:
            self._deactivate_impl()
        finally:
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        if self.is_active:
            self.deactivate()

    # ------------------------------------------------------------- inference
    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """Run with inputs in Program order (or by name); outputs in Program order."""
        if not self.is_active:
            raise RunnerError(
                f"{self.name} | runner is not active; use `with graphopt.load(dir) as runner:` "
                "or call runner.activate() first"
            )
        bound = bind_inputs(self.inputs, args, kwargs, self.name)
        check_inputs(self.inputs, bound, self.name)
        try:
            outputs = tuple(self._infer_impl(bound))
        except GraphoptError:
            raise
        except Exception as e:
            raise RunnerError(f"{self.name} | inference failed: {first_line(e, with_type=False)}") from e
        if len(outputs) != len(self.output_names):
            raise RunnerError(
                f"{self.name} | backend returned {len(outputs)} outputs, manifest names "
                f"{len(self.output_names)} ({', '.join(self.output_names)}); re-lower the artifact"
            )
        return outputs

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Polygraphy-style: feed dict by input name -> dict by output name."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if extra:
            raise RunnerError(f"{self.name} | unknown input '{extra[0]}'; inputs are {self.input_names}")
        if missing:
            raise RunnerError(f"{self.name} | missing input '{missing[0]}'; inputs are {self.input_names}")
        outputs = self(*(feeds[n] for n in self.input_names))
        return dict(zip(self.output_names, outputs))

    def synchronize(self) -> None:
        """Wait for queued device work (call before reading a timer)."""
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()

    # ----------------------------------------------------------- subclasses
    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        pass

    def __repr__(self) -> str:
        where = self.artifact.path if self.artifact else "in-memory"
        state = "active" if self.is_active else "inactive"
        return f"<{type(self).__name__} {self.name} {where} on {self.device}, {state}>"


# -------------------------------------------------------------------- backend
class Backend:
    """One runtime: availability, lowering into a directory, and its Runner.

    Subclasses set ``name``, ``summary``, ``lower_options``,
    ``runner_options`` and ``runner_class`` and implement
    :meth:`unavailable_reason`, :meth:`lower_into` and optionally
    :meth:`check_program` and :meth:`versions`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lower_options: ClassVar[tuple[RuntimeOption, ...]] = ()
    runner_options: ClassVar[tuple[RuntimeOption, ...]] = ()
    runner_class: ClassVar[type[Runner]] = Runner

    def unavailable_reason(self) -> str | None:
        """None when usable here, else why not (missing package, no CUDA)."""
        return None

    def versions(self) -> dict[str, str]:
        return {}

    def check_program(self, program: Program, options: Mapping[str, Any]) -> None:
        """Raise LoweringError for a Program this backend cannot take."""

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        """Write the model file(s) into ``out``; return the manifest's ``backend`` section
        (must name the main file as ``entry``)."""
        raise NotImplementedError

    def make_runner(self, artifact: Artifact, options: Mapping[str, Any]) -> Runner:
        return self.runner_class(artifact, artifact.inputs, artifact.output_names, **options)


def register_runtime(backend: Backend) -> Backend:
    """Register a third-party runtime (built-ins register themselves lazily)."""
    if not backend.name:
        raise LoweringError(f"{type(backend).__name__} has no name")
    _REGISTRY[backend.name] = backend
    return backend


def runtime_names() -> list[str]:
    return list(dict.fromkeys([*_BUILTIN, *_REGISTRY]))


def get_runtime(name: str) -> Backend:
    """The Backend named ``name`` (imports ``graphopt.runtimes.<name>`` on first use)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in _BUILTIN:
        from graphopt.errors import closest

        raise LoweringError(
            f"unknown runtime '{name}'{closest(name, runtime_names())}; runtimes: {', '.join(runtime_names())}"
        )
    module = importlib.import_module(f"graphopt.runtimes.{_BUILTIN[name]}")
    backend: Backend = module.BACKEND
    _REGISTRY[name] = backend
    return backend


@dataclass
class RuntimeStatus:
    name: str
    available: bool
    reason: str
    summary: str
    versions: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "available": self.available,
            "reason": self.reason,
            "summary": self.summary,
            "versions": self.versions,
        }


def available_runtimes() -> dict[str, RuntimeStatus]:
    """Every known runtime with whether it works here and, if not, why."""
    out: dict[str, RuntimeStatus] = {}
    for name in runtime_names():
        backend = get_runtime(name)
        reason = backend.unavailable_reason()
        versions = backend.versions() if reason is None else {}
        out[name] = RuntimeStatus(name, reason is None, reason or "", backend.summary, versions)
    return out


def _require(backend: Backend) -> None:
    reason = backend.unavailable_reason()
    if reason:
        raise BackendUnavailableError(f"{backend.name} | not available here: {reason}")


# -------------------------------------------------------------------- artifact
@dataclass
class Artifact:
    """A lowered model on disk: ``path`` plus its parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def runtime(self) -> str:
        return str(self.manifest["runtime"])

    @property
    def inputs(self) -> list[InputSpec]:
        return [InputSpec.from_json(d) for d in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return list(self.manifest["outputs"])

    @property
    def backend(self) -> dict[str, Any]:
        return dict(self.manifest.get("backend", {}))

    @property
    def entry(self) -> Path:
        """The main model file."""
        return self.path / self.manifest["backend"]["entry"]

    def file(self, name: str) -> Path:
        return self.path / name

    def load(self, **options: Any) -> Runner:
        return load(self.path, **options)

    def __repr__(self) -> str:
        return f"Artifact({self.runtime!r}, {str(self.path)!r}, model={self.manifest.get('model')!r})"


def _versions(backend: Backend) -> dict[str, str]:
    import graphopt

    return {"graphopt": graphopt.__version__, "torch": torch.__version__, **backend.versions()}


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
    _require(backend)
    opts = _resolve_options(backend.lower_options, options, f"{runtime} | lower", LoweringError)
    backend.check_program(program, opts)
    with atomic_directory(out_dir, force=force) as tmp, quiet_backends():
        try:
            info = backend.lower_into(program, tmp, opts)
        except GraphoptError:
            raise
        except Exception as e:  # backend exporters raise many unrelated types
            if os.environ.get("GRAPHOPT_DEBUG"):
                raise
            raise LoweringError(
                f"{runtime} | lowering {program.name} failed: {first_line(e, with_type=True)}; "
                "set GRAPHOPT_DEBUG=1 (or --debug) for the traceback"
            ) from e
        if "entry" not in info or not (tmp / info["entry"]).is_file():
            raise LoweringError(f"{runtime} | lowering wrote no entry file ({info.get('entry')!r})")
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            if rel != MANIFEST_FILE:
                files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {
            "format": MANIFEST_FORMAT,
            "runtime": runtime,
            "model": program.name,
            "source": program.meta.get("zoo") or program.meta.get("hf_directory") or program.name,
            "pipeline": program.pipeline,
            "inputs": [s.to_json() for s in program.inputs],
            "outputs": list(program.output_names),
            "dims": dim_ranges(program),
            "options": {k: v for k, v in opts.items()},
            "versions": _versions(backend),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "backend": info,
            "files": files,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    log.info("lowered %s with %s into %s (%d files)", program.name, runtime, out_dir, len(files))
    return Artifact(Path(out_dir), manifest)


def read_artifact(out_dir: str | os.PathLike[str], *, verify: bool = True) -> Artifact:
    """Parse and check an artifact directory (manifest format, files, checksums)."""
    path = Path(out_dir)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory; lower a Program into it first")
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise ArtifactError(
            f"{path} has no {MANIFEST_FILE}; it is not a graphopt artifact "
            "(write one with graphopt.lower or `graphopt optimize --runtime`)"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({first_line(e)}); re-lower the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} is not a JSON object; re-lower the artifact")
    fmt = manifest.get("format")
    if fmt != MANIFEST_FORMAT:
        raise ArtifactError(
            f"{path} has manifest format {fmt!r}, this graphopt reads {MANIFEST_FORMAT!r}; "
            "re-lower the Program with this graphopt"
        )
    for key in ("runtime", "inputs", "outputs", "files", "backend"):
        if key not in manifest:
            raise ArtifactError(f"{mpath} lacks '{key}'; re-lower the artifact")
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing; re-lower the artifact")
        if verify:
            if f.stat().st_size != info.get("bytes", f.stat().st_size) or sha256_file(f) != info.get("sha256"):
                raise ArtifactError(
                    f"{path}: checksum mismatch for {name} (changed or corrupted since lowering); "
                    "re-lower the artifact"
                )
    return Artifact(path, manifest)


def load(out_dir: str | os.PathLike[str], *, verify: bool = True, **options: Any) -> Runner:
    """Check the artifact in ``out_dir`` and return an (inactive) Runner for it.

    ``options`` are the runtime's runner options (threads, providers...).
    ``verify=False`` skips the sha256 checks (missing files are still errors).
    """
    artifact = read_artifact(out_dir, verify=verify)
    try:
        backend = get_runtime(artifact.runtime)
    except LoweringError:
        raise ArtifactError(
            f"{artifact.path} was lowered for runtime '{artifact.runtime}', which this graphopt does not know"
        ) from None
    _require(backend)
    written = artifact.manifest.get("versions", {}).get("torch")
    if written and written != torch.__version__ and artifact.runtime in ("inductor", "torchscript"):
        log.warning("%s was lowered with torch %s, running with %s", artifact.path, written, torch.__version__)
    opts = _resolve_options(backend.runner_options, options, f"{artifact.runtime} | load", RunnerError)
    return backend.make_runner(artifact, opts)
