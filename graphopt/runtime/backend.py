"""A runtime's backend: availability, lowering into a directory, its Runner;
and the registry of runtimes.

Each built-in runtime is a module ``graphopt.runtimes.<name>`` exposing
``BACKEND`` (a :class:`Backend`); it is imported only when first used, so a
missing optional package (onnxruntime, tensorrt) only disables that runtime.
A renamed runtime's old name (:data:`RENAMED_RUNTIMES`) still resolves, with a
one-line deprecation note in the log.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from graphopt.errors import BackendUnavailableError, LoweringError, closest
from graphopt.ir.program import Program
from graphopt.options import Option
from graphopt.runtime.runner import Runner

if TYPE_CHECKING:
    from graphopt.runtime.artifact import Artifact

__all__ = [
    "Backend",
    "RuntimeStatus",
    "register_runtime",
    "RENAMED_RUNTIMES",
    "canonical_runtime",
    "runtime_names",
    "get_runtime",
    "available_runtimes",
    "require_available",
    "program_dtypes",
    "is_quantized",
    "resolve_device",
]

#: built-in runtimes -> module under graphopt.runtimes (imported lazily)
_BUILTIN: dict[str, str] = {
    "eager": "eager",
    "torchscript": "torchscript",
    "onnxruntime": "onnxruntime",
    "inductor": "inductor",
    "tensorrt": "tensorrt",
    "stages": "stages",
}
#: old runtime names -> their current names (accepted with a deprecation note)
RENAMED_RUNTIMES: dict[str, str] = {"pipeline": "stages"}
_REGISTRY: dict[str, Backend] = {}

log = logging.getLogger(__name__)


def program_dtypes(program: Program) -> set[torch.dtype]:
    """Every tensor dtype the Program holds or computes (weights and node values)."""
    dtypes = {t.dtype for t in program.parameter_tensors().values()}
    for node in program.graph.nodes:
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else (val,)
        dtypes.update(v.dtype for v in vals if isinstance(v, torch.Tensor))
    return dtypes


_GEMMS = ("aten.linear.", "aten.addmm.", "aten.mm.", "aten.matmul.", "aten._addmm_activation.")


def gemm_weight_elements(program: Program) -> int:
    """Elements of the 2-D weights the Program's GEMMs read (linear, addmm, mm, matmul),
    through up to three ops between weight and GEMM (transpose, cast, dequantize)."""
    params = program.parameter_tensors()
    total = 0
    for node in program.graph.nodes:
        if node.op != "get_attr" or node.target not in params or params[node.target].dim() != 2:
            continue
        frontier, reaches = [node], False
        for _ in range(3):
            users = [u for n in frontier for u in n.users if u.op == "call_function"]
            reaches = any(str(u.target).startswith(_GEMMS) for u in users)
            if reaches:
                break
            frontier = users
        total += params[node.target].numel() if reaches else 0
    return total


def is_quantized(program: Program) -> bool:
    """True when the graph holds quantize/dequantize ops (QDQ int8)."""
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        namespace = getattr(node.target, "namespace", "")
        if namespace == "quantized_decomposed" or "quantize" in str(node.target):
            return True
    return False


def mutated_buffers(program: Program) -> list[str]:
    """Buffers the graph updates in place (``self.count.add_(1)`` is captured as ``copy_`` into it),
    directly or through a view (:func:`graphopt.transform.state.mutated_attrs`)."""
    from graphopt.transform.state import mutated_attrs

    return sorted(mutated_attrs(program.gm.graph))


def check_state(backend: Backend, program: Program) -> None:
    """Refuse, in one line, a Program that updates buffers for a runtime that keeps no state
    (was: ONNX Runtime and Inductor served every call from the captured value while eager and
    TorchScript advanced the state, the same artifact scoring differently per runtime)."""
    names = mutated_buffers(program)
    if names and not backend.keeps_state:
        shown = ", ".join(n.removeprefix("model.") for n in names[:3]) + (" ..." if len(names) > 3 else "")
        raise LoweringError(f"{backend.name} | {program.name} updates {shown} in place on every call (model state: "
                            "a counter, running statistics, max_norm's renormalised weights); "
                            f"{backend.name} artifacts keep no state between calls and would score each call from "
                            "the captured value: lower it for eager or torchscript, or pass the state in as an "
                            "input and return its update")


def resolve_device(device: str, runtime: str) -> str:
    """``auto`` -> ``cuda`` where a CUDA device is present, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"{runtime} | device {device!r} asked for, but no CUDA device is visible")
    if device != "cpu" and not device.startswith("cuda"):
        raise LoweringError(f"{runtime} | device must be auto, cpu or cuda[:N], got {device!r}")
    return device


class Backend:
    """One runtime: availability, lowering into a directory, and its Runner.

    Subclasses set ``name``, ``summary``, ``lower_options``,
    ``runner_options`` and ``runner_class`` and implement
    :meth:`unavailable_reason`, :meth:`lower_into` and optionally
    :meth:`check_program` and :meth:`versions`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lower_options: ClassVar[tuple[Option, ...]] = ()
    runner_options: ClassVar[tuple[Option, ...]] = ()
    runner_class: ClassVar[type[Runner]] = Runner
    #: whether a Program's in-place buffer updates persist from one call to the next (eager,
    #: TorchScript); a runtime without them refuses such a Program (:func:`check_state`)
    keeps_state: ClassVar[bool] = False

    def unavailable_reason(self) -> str | None:
        """None when usable here, else why not (missing package, no CUDA)."""
        return None

    def versions(self) -> dict[str, str]:
        return {}

    def check_program(self, program: Program, options: Mapping[str, Any]) -> None:
        """Raise LoweringError for a Program this backend cannot take."""

    def complete_options(self, program: Program, options: Mapping[str, Any]) -> dict[str, Any]:
        """The resolved lowering options with any left unset (``None``: an option whose
        default depends on the Program) decided for ``program``; what the manifest records."""
        return dict(options)

    def prefill_defaults(self, prefill: Program, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Lowering options for an incremental ``prefill`` entry that differ from this runtime's
        defaults, given the caller's ``options`` (they override what this returns)."""
        return {}

    def step_defaults(self, step: Program, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Lowering options for an incremental ``step`` entry (a few rows per user) that differ
        from this runtime's defaults, given the caller's ``options`` (``step_options`` merged in;
        they override what this returns)."""
        return {}

    def lower_into(self, program: Program, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        """Write the model file(s) into ``out``; return the manifest's ``backend`` section
        (must name the main file as ``entry``)."""
        raise NotImplementedError

    def artifact_files(self, backend: Mapping[str, Any]) -> list[str]:
        """The files of an artifact that this runtime's runner opens, by their names in the
        manifest, given the manifest's ``backend`` section (the entry, by default).
        ``read_artifact`` checks each is inside the folder and has a checksum before
        anything is read; a KeyError/TypeError/ValueError here reports a malformed section."""
        return [backend["entry"]]

    def make_runner(self, artifact: Artifact, options: Mapping[str, Any]) -> Runner:
        return self.runner_class(artifact, artifact.inputs, artifact.output_names, **options)


def register_runtime(backend: Backend) -> Backend:
    """Register a third-party runtime (built-ins register themselves lazily)."""
    if not backend.name:
        raise LoweringError(f"{type(backend).__name__} has no name")
    _REGISTRY[backend.name] = backend
    return backend


def canonical_runtime(name: str, *, note: bool = True) -> str:
    """The current name of runtime ``name``. An old name logs a one-line
    deprecation note unless ``note`` is False (artifacts lowered before a
    rename load without one)."""
    new = RENAMED_RUNTIMES.get(name)
    if new is None:
        return name
    if note:
        log.warning("runtime '%s' is now '%s'; the old name will be removed", name, new)
    return new


def runtime_names() -> list[str]:
    return list(dict.fromkeys([*_BUILTIN, *_REGISTRY]))


def check_runtime_name(name: str) -> str:
    """``name``'s current name, without importing its backend; an unknown one is a LoweringError
    naming the closest runtime."""
    name = canonical_runtime(name)
    if name not in _REGISTRY and name not in _BUILTIN:
        raise LoweringError(
            f"unknown runtime '{name}'{closest(name, runtime_names())}; runtimes: {', '.join(runtime_names())}"
        )
    return name


def get_runtime(name: str) -> Backend:
    """The Backend named ``name`` (imports ``graphopt.runtimes.<name>`` on first use;
    an old name of a renamed runtime resolves to it, see :func:`canonical_runtime`)."""
    name = check_runtime_name(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
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


def require_available(backend: Backend) -> None:
    reason = backend.unavailable_reason()
    if reason:
        raise BackendUnavailableError(f"{backend.name} | not available here: {reason}")
