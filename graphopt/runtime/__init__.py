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

from graphopt.options import Option
from graphopt.runtime.artifact import MANIFEST_FILE, MANIFEST_FORMAT, Artifact, read_artifact, sha256_file
from graphopt.runtime.backend import (
    RENAMED_RUNTIMES,
    Backend,
    RuntimeStatus,
    available_runtimes,
    canonical_runtime,
    get_runtime,
    is_quantized,
    program_dtypes,
    register_runtime,
    require_available,
    resolve_device,
    runtime_names,
)
from graphopt.runtime.contract import dim_ranges
from graphopt.runtime.incremental import IncrementalState, lower_incremental
from graphopt.runtime.lower import load, lower
from graphopt.runtime.runner import Runner

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_FILE",
    "Option",
    "Backend",
    "Runner",
    "Artifact",
    "RuntimeStatus",
    "lower",
    "load",
    "lower_incremental",
    "IncrementalState",
    "read_artifact",
    "available_runtimes",
    "runtime_names",
    "canonical_runtime",
    "RENAMED_RUNTIMES",
    "get_runtime",
    "register_runtime",
    "require_available",
    "program_dtypes",
    "dim_ranges",
    "is_quantized",
    "resolve_device",
    "sha256_file",
]
