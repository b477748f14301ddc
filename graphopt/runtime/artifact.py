"""An artifact on disk: a lowered model's files plus ``manifest.json``.

The manifest (:data:`MANIFEST_FORMAT`) records the runtime, input
names/dtypes/dynamic dims, output names, the canonical pipeline and source
model, graphopt/torch/backend versions, lowering options and a sha256
checksum per file. :func:`read_artifact` refuses a directory whose manifest is
missing, of another format, or whose files are missing or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.errors import ArtifactError, first_line
from graphopt.ir.program import InputSpec
from graphopt.runtime.backend import canonical_runtime

if TYPE_CHECKING:
    from graphopt.runtime.runner import Runner

__all__ = ["MANIFEST_FORMAT", "MANIFEST_FILE", "Artifact", "read_artifact", "sha256_file"]

MANIFEST_FORMAT = "graphopt.artifact/1"
MANIFEST_FILE = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Artifact:
    """A lowered model on disk: ``path`` plus its parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def runtime(self) -> str:
        """The runtime it was lowered for, by its current name (an artifact
        written under a renamed runtime's old name reads as the new one)."""
        return canonical_runtime(str(self.manifest["runtime"]), note=False)

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
        from graphopt.runtime.lower import load

        return load(self.path, **options)

    def __repr__(self) -> str:
        return f"Artifact({self.runtime!r}, {str(self.path)!r}, model={self.manifest.get('model')!r})"


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
