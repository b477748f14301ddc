"""Atomic output directories: write into a temp sibling, then rename into place.

An existing directory is never replaced unless ``force`` is set, and a crash
mid-write leaves the old directory (or nothing) behind, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graphopt.errors import ArtifactError

__all__ = ["atomic_directory"]


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """``with atomic_directory("out") as tmp: write files into tmp``."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --force (force=True) to overwrite it")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; remove it or pick another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
