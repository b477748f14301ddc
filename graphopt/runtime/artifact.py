"""An artifact on disk: a lowered model's files plus ``manifest.json``.

The manifest (:data:`MANIFEST_FORMAT`) records the runtime, input
names/dtypes/dynamic dims, output names, the canonical pipeline and source
model, graphopt/torch/backend versions, lowering options and a sha256
checksum and size per file. :func:`read_artifact` trusts nothing it has not
checked, in this order, before any model file is opened:

1. the manifest: JSON, this format, every key there with the right type;
2. paths: every file the manifest names (its ``files`` and the ones the
   runtime opens, :meth:`Backend.artifact_files`) is a plain relative name
   inside the folder (no absolute path, no ``..``, no link leading out);
3. coverage: every file the runtime opens has a checksum, and every file in
   the folder is listed (nothing was added after lowering);
4. contents: each file has its recorded size (always) and sha256
   (``verify=True``, the default);
5. the manifest itself: its ``digest`` is the sha256 of the rest of it, so a
   hand edit that the checks above accept (an input contract deleted or
   widened, which would switch the runner's id range checks off) is refused.
   :func:`write_manifest` writes it; an edit meant to stick is a re-lowering.

Every refusal is one :class:`ArtifactError` line, in the same words for
every runtime (``onnxruntime | out/ort: model.onnx is 812 bytes, the
manifest says 95630 (truncated or changed since lowering); re-lower the
artifact``). A Runner loads its files later, on its first call; it calls
:meth:`Artifact.check_unchanged` first, so a file changed in between is
caught too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from graphopt.errors import ArtifactError, LoweringError, first_line
from graphopt.ir.program import InputSpec
from graphopt.runtime.backend import canonical_runtime, get_runtime

if TYPE_CHECKING:
    from graphopt.runtime.runner import Runner

__all__ = ["MANIFEST_FORMAT", "MANIFEST_FILE", "Artifact", "read_artifact", "sha256_file", "write_manifest"]

MANIFEST_FORMAT = "graphopt.artifact/2"  # /2: the manifest carries its own digest
MANIFEST_FILE = "manifest.json"
#: files in an artifact folder that the manifest does not list (the marker of graphopt.outputs)
_UNLISTED_OK = frozenset({MANIFEST_FILE, ".graphopt"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RELOWER = "re-lower the artifact"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's JSON without its ``digest`` key (keys sorted, compact)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    text = json.dumps(json.loads(json.dumps(body, default=str)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder/manifest.json`` with its ``digest``; returns the manifest as written."""
    manifest = {**{k: v for k, v in manifest.items() if k != "digest"}, "digest": manifest_digest(manifest)}
    (Path(folder) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass
class Artifact:
    """A lowered model on disk: ``path`` plus its parsed, checked manifest."""

    path: Path
    manifest: dict[str, Any]
    #: whether the sha256 of every file was checked (``read_artifact(verify=...)``)
    verified: bool = False
    _stamps: dict[str, tuple[int, int, int, int]] = field(default_factory=dict, repr=False)

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
        return self.file(self.manifest["backend"]["entry"])

    def file(self, name: str) -> Path:
        """The path of ``name``, a file the manifest lists (and :func:`read_artifact` checked)."""
        if self._stamps and name not in self._stamps:
            raise ArtifactError(f"{self._where()}{name!r} is not a file of this artifact; {_RELOWER}")
        return self.path / name

    def check_unchanged(self) -> None:
        """Refuse files changed since :func:`read_artifact` checked them (re-checks only
        those whose size, mtime or inode moved; a Runner calls this before loading)."""
        if not self.path.is_dir():
            raise ArtifactError(f"{self._where()}the folder is gone since load() read it (moved or deleted); "
                                "load it again from where it is now") from None
        for name, stamp in self._stamps.items():
            f = self.path / name
            try:
                now = _stamp(f.stat())
            except OSError:
                raise ArtifactError(f"{self._where()}file {name} was removed after the artifact was checked; "
                                    f"{_RELOWER}") from None
            if now != stamp:
                self._stamps[name] = _check_contents(self.path, name, self.manifest["files"][name],
                                                     self.verified, self._where())

    def load(self, **options: Any) -> Runner:
        from graphopt.runtime.lower import load

        return load(self.path, **options)

    def _where(self) -> str:
        return f"{self.runtime} | {self.path}: "

    def __repr__(self) -> str:
        return f"Artifact({self.runtime!r}, {str(self.path)!r}, model={self.manifest.get('model')!r})"


# ------------------------------------------------------------------ manifest
def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise ArtifactError(
            f"{path} has no {MANIFEST_FILE}; it is not a graphopt artifact "
            "(write one with graphopt.lower or `graphopt optimize --runtime`)"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({first_line(e)}); {_RELOWER}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} is not a JSON object; {_RELOWER}")
    fmt = manifest.get("format")
    if fmt != MANIFEST_FORMAT:
        raise ArtifactError(
            f"{path} has manifest format {fmt!r}, this graphopt reads {MANIFEST_FORMAT!r}; "
            "re-lower the Program with this graphopt"
        )
    for key in ("runtime", "inputs", "outputs", "files", "backend", "digest"):
        if key not in manifest:
            raise ArtifactError(f"{mpath} lacks '{key}'; {_RELOWER}")
    problem = _schema_problem(manifest)
    if problem:
        raise ArtifactError(f"{mpath}: {problem}; {_RELOWER}")
    return manifest


def _schema_problem(m: dict[str, Any]) -> str:
    """What is wrong with the manifest's types ('' when nothing)."""
    if not isinstance(m["runtime"], str) or not m["runtime"]:
        return "'runtime' must be a runtime name"
    if not (isinstance(m["digest"], str) and _SHA256.match(m["digest"])):
        return "'digest' must be the manifest's sha256 (64 hex digits)"
    if not isinstance(m["outputs"], list) or not all(isinstance(o, str) for o in m["outputs"]):
        return "'outputs' must be a list of names"
    if not isinstance(m["inputs"], list):
        return "'inputs' must be a list of input specs"
    for i, spec in enumerate(m["inputs"]):
        try:
            InputSpec.from_json(spec)
        except Exception as e:  # KeyError, TypeError, ValueError, AttributeError from a bad spec
            return f"input {i} is not an input spec ({first_line(e, with_type=True)})"
    files = m["files"]
    if not isinstance(files, dict):
        return "'files' must map each file name to its sha256 and bytes"
    for name, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and _SHA256.match(info["sha256"])
                and type(info.get("bytes")) is int and info["bytes"] >= 0):
            return f"file {name!r} needs a sha256 (64 hex digits) and a byte count"
    if not isinstance(m["backend"], dict) or not isinstance(m["backend"].get("entry"), str):
        return "'backend' must be an object naming the 'entry' file"
    dims = m.get("dims") or {}
    if not isinstance(dims, dict) or not all(
        isinstance(b, dict) and all(v is None or type(v) is int for v in b.values()) for b in dims.values()
    ):
        return "'dims' must map each dim label to its min and max"
    ranges = m.get("index_ranges") or {}
    if not isinstance(ranges, dict) or not all(_index_range(r) for r in ranges.values()):
        return "'index_ranges' must map each input to [low, high) or {\"dim\": d, \"high\": [rows per slot]}"
    return ""


def _index_range(r: Any) -> bool:
    """``[low, high)``, or one range per slot along a dim (DLRM's sparse features), or
    EmbeddingBag offsets (``{"offsets_of": ids input, "include_last_offset": bool}``)."""
    if isinstance(r, dict) and set(r) == {"offsets_of", "include_last_offset"}:
        return isinstance(r["offsets_of"], str) and type(r["include_last_offset"]) is bool
    if isinstance(r, dict):
        return (set(r) == {"dim", "high"} and type(r["dim"]) is int and r["dim"] >= 0
                and isinstance(r["high"], list) and all(type(v) is int and v > 0 for v in r["high"]))
    return isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)


# --------------------------------------------------------------------- files
def _inside(path: Path, name: str, where: str) -> None:
    """Refuse a manifest file name that could lead outside the artifact folder."""
    pure = PurePosixPath(name)
    if (not name or "\\" in name or "\x00" in name or pure.is_absolute() or ".." in pure.parts
            or pure.parts in ((), (".",))):
        raise ArtifactError(f"{where}the manifest names file {name!r}, which is not inside the artifact folder; "
                            f"refusing to read it; {_RELOWER}")
    root = path.resolve()
    target = (path / name).resolve()
    if target == root or not target.is_relative_to(root):
        raise ArtifactError(f"{where}file {name} links to {target}, outside the artifact folder; "
                            f"refusing to read it; {_RELOWER}")


def _check_contents(path: Path, name: str, info: Mapping[str, Any], verify: bool,
                    where: str) -> tuple[int, int, int, int]:
    f = path / name
    if not f.is_file():
        raise ArtifactError(f"{where}file {name} listed in the manifest is missing; {_RELOWER}")
    stamp = _stamp(f.stat())
    if stamp[0] != info["bytes"]:
        raise ArtifactError(f"{where}{name} is {stamp[0]} bytes, the manifest says {info['bytes']} "
                            f"(truncated or changed since lowering); {_RELOWER}")
    if verify and sha256_file(f) != info["sha256"]:
        raise ArtifactError(f"{where}checksum mismatch for {name} (changed or corrupted since lowering); "
                            f"{_RELOWER}")
    return stamp


def _unlisted(path: Path, listed: set[str]) -> list[str]:
    found = []
    for root, _dirs, names in os.walk(path):
        for n in names:
            rel = (Path(root) / n).relative_to(path).as_posix()
            if rel not in listed and rel not in _UNLISTED_OK:
                found.append(rel)
    return sorted(found)


def read_artifact(out_dir: str | os.PathLike[str], *, verify: bool = True) -> Artifact:
    """Parse and check an artifact directory (manifest, paths, coverage, sizes and,
    with ``verify``, sha256 checksums), before any model file is opened."""
    path = Path(out_dir)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory; lower a Program into it first")
    manifest = _read_manifest(path)
    runtime = canonical_runtime(manifest["runtime"], note=False)
    where = f"{runtime} | {path}: "
    try:
        backend = get_runtime(runtime)
    except LoweringError:
        raise ArtifactError(
            f"{path} was lowered for runtime '{manifest['runtime']}', which this graphopt does not know"
        ) from None
    try:
        opened = [str(n) for n in backend.artifact_files(manifest["backend"])]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ArtifactError(f"{where}the manifest's backend section is malformed "
                            f"({first_line(e, with_type=True)}); {_RELOWER}") from None
    files: dict[str, Any] = manifest["files"]
    for name in [*files, *opened]:  # every path is checked before anything is read
        _inside(path, name, where)
    for name in opened:
        if name not in files:
            raise ArtifactError(f"{where}{name} has no checksum in the manifest; {_RELOWER}")
    extra = _unlisted(path, set(files))
    if extra:
        raise ArtifactError(f"{where}file {extra[0]} is not listed in the manifest (added after lowering); "
                            f"remove it or {_RELOWER}")
    stamps = {name: _check_contents(path, name, info, verify, where) for name, info in files.items()}
    if manifest["digest"] != manifest_digest(manifest):  # last: the checks above name what they find
        raise ArtifactError(f"{where}{MANIFEST_FILE} was edited after lowering (its digest does not match its "
                            f"contents); an edited input contract would switch the runner's checks off; {_RELOWER}")
    return Artifact(path, manifest, verified=verify, _stamps=stamps)
