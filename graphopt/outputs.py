"""Atomic output directories: write into a temp sibling, then rename into place.

An existing directory is never replaced unless ``force`` is set, and even
then only when graphopt wrote it (its :data:`MARKER` file, or a manifest,
report or checkpoint file graphopt writes, is there) or it is empty: a
user's folder is refused with one line whatever the flags. A path at ``.``,
``~``, ``/`` or a folder holding the current directory or graphopt's own
checkout is refused as an output. A crash or a failure mid-write leaves the
old directory (or nothing) behind, never a half-written one. Replacing an
existing folder swaps old and new in one ``renameat2(RENAME_EXCHANGE)`` call
where the OS has it (Linux), so the path always names a complete folder, even
for a reader or a SIGKILL between the two renames the fallback needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from graphopt.errors import ArtifactError

__all__ = ["MARKER", "atomic_directory", "check_output_path", "check_replaceable", "written_by_graphopt"]

#: written into every output folder graphopt creates
MARKER = ".graphopt"
#: files that also mark a folder as graphopt's (written before the marker existed)
_KNOWN_FILES = ("manifest.json", "report.json", "demo.json", "graphopt-checkpoint.json")
_CHECKOUT = Path(__file__).resolve().parents[1]


def written_by_graphopt(path: Path) -> bool:
    """Whether ``path`` is a folder graphopt wrote (its marker or a known graphopt file is there)."""
    return any((path / name).is_file() for name in (MARKER, *_KNOWN_FILES))


def check_output_path(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse output paths that would hold or replace something precious; return the path.

    Refused: ``.``, ``/``, the home folder, and any folder that contains the
    current directory or graphopt's own checkout.
    """
    out = Path(out_dir).expanduser()
    resolved = out.resolve()
    here = Path.cwd().resolve()
    precious = {Path("/"), Path.home().resolve()}
    if resolved in precious or resolved == here or here.is_relative_to(resolved) or _CHECKOUT.is_relative_to(resolved):
        raise ArtifactError(f"refusing to write output into {out_dir!s} (it holds the working directory, "
                            "the home folder or graphopt itself); pick a new folder with -o")
    return out


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _replaceable(out: Path) -> bool:
    return out.is_dir() and (written_by_graphopt(out) or not any(out.iterdir()))


def check_replaceable(out_dir: str | os.PathLike[str], *, force: bool = False) -> Path:
    """The checks :func:`atomic_directory` makes before writing, on their own, so a long
    job (bench, demo) can refuse its output folder before it starts; returns the path."""
    out = check_output_path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; remove it or pick another path")
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --force (force=True) to overwrite it")
    if out.exists() and not _replaceable(out):
        raise ArtifactError(f"{out} exists and was not written by graphopt (no {MARKER} file); "
                            "graphopt will not replace it even with --force; pick another -o")
    return out


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike[str], *, force: bool = False, kind: str = "output") -> Iterator[Path]:
    """``with atomic_directory("out") as tmp: write files into tmp``; the folder gets :data:`MARKER`.

    ``force`` replaces an existing folder only if graphopt wrote it or it is empty.
    """
    out = check_replaceable(out_dir, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "created": time.time()}) + "\n")
        if out.exists() and _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        elif out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
