"""Atomic output directories: write into a temp sibling, then rename into place.

An existing directory is never replaced unless ``force`` is set, and even
then only when graphopt wrote it (its :data:`MARKER` file, listing what it
wrote, is there) or it is empty: a user's folder is refused with one line
whatever the flags, even one holding a file named like graphopt's
(``report.json``, ``manifest.json``). The marker lists
the files graphopt wrote (and the names it goes on writing, ``later``), so a
folder holding anything else, a user's notes added to a report folder, is
refused too: ``--force`` replaces only what graphopt wrote. A path at ``.``,
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
import fnmatch
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from graphopt.errors import ArtifactError

__all__ = ["MARKER", "atomic_directory", "check_output_path", "check_replaceable", "foreign_files", "marker_kind",
           "written_by_graphopt"]

#: written into every output folder graphopt creates
MARKER = ".graphopt"
_CHECKOUT = Path(__file__).resolve().parents[1]
#: graphopt's own temporaries: ``tempfile.mkdtemp(prefix=".NAME.tmp-")`` (or ``.old-``), 8 random characters
_TEMPORARY = re.compile(r"\..+\.(tmp|old)-[a-z0-9_]{8}")


def _marker(path: Path) -> dict[str, Any] | None:
    """``path``'s :data:`MARKER`, where it is one graphopt wrote (a JSON object listing its files)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def written_by_graphopt(path: Path) -> bool:
    """Whether ``path`` is a folder graphopt wrote: its marker is there and lists what it wrote
    (a file named like graphopt's, ``report.json``, proves nothing: a user's folder may hold one)."""
    return _marker(path) is not None


def marker_kind(path: Path) -> str | None:
    """The kind of output graphopt recorded in ``path``'s marker (``reproducer``, ``tune``, ...)."""
    marker = _marker(path)
    return str(marker.get("kind")) if marker is not None else None


def foreign_files(path: Path) -> list[str]:
    """Files under ``path`` that graphopt did not write, per its :data:`MARKER`'s list (every file, for
    a folder without a valid marker). Graphopt's own temporaries (``.NAME.tmp-XXXXXXXX``, ``.old-``, at
    any depth) are its own; a nested folder with its own marker (a tune's ``best/``, a work artifact)
    is checked against that marker's list where the outer one lists it (another output nested inside,
    a report the user wrote there, is foreign: replacing would drop it), a symlink to a folder is
    foreign; ``later`` names only top-level entries, so a folder named
    there holds nothing but nested graphopt outputs and temporaries: a user's file put inside it is
    foreign."""
    marker = _marker(path)
    ours = set(marker["files"]) | {MARKER} if marker is not None else set()
    later = [str(p) for p in marker.get("later", [])] if marker is not None else []
    found = []
    for root, dirs, files in os.walk(path):
        here = Path(root)
        inner = []
        for d in dirs:
            rel = (here / d).relative_to(path).as_posix()
            if _temporary(d):
                continue  # graphopt's own half-written or replaced folder
            if (here / d).is_symlink():  # a link the user made (graphopt writes none): replacing drops it
                found.append(rel)
            elif (here / d / MARKER).is_file() and _listed(rel, ours, later):
                found += [f"{rel}/{f}" for f in foreign_files(here / d)]  # ours, nested: it speaks for itself
            elif (here / d / MARKER).is_file():  # another graphopt output put inside this one: not ours to drop
                found += [f"{rel}/{f}" for f in _written(here / d)]
            else:
                inner.append(d)
        dirs[:] = inner
        for name in files:
            rel = (here / name).relative_to(path).as_posix()
            top_level = "/" not in rel
            if rel in ours or _temporary(name) or (top_level and any(fnmatch.fnmatch(rel, p) for p in later)):
                continue
            found.append(rel)
    return sorted(found)


def _listed(rel: str, ours: set[str], later: list[str]) -> bool:
    """Whether the folder ``rel`` is part of the output ``ours`` / ``later`` describe (a folder
    ``later`` names holds graphopt's nested outputs: a tune's ``best/``, its ``.work/t0003``)."""
    top = rel.split("/", 1)[0]
    return any(f.startswith(rel + "/") for f in ours) or any(fnmatch.fnmatch(top, p) for p in later)


def _temporary(name: str) -> bool:
    return _TEMPORARY.fullmatch(name) is not None


def _written(tmp: Path) -> list[str]:
    return sorted((Path(root) / f).relative_to(tmp).as_posix() for root, _, files in os.walk(tmp) for f in files)


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


def _check_parent(out: Path) -> None:
    """The nearest existing folder above ``out`` is a folder graphopt can write into: probed with a
    temporary folder made and removed there, so a run fails before its work, not when it saves."""
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"cannot write {out}: {parent} is a file, not a folder; pick another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".graphopt-probe-", dir=parent))
    except OSError as e:
        raise ArtifactError(f"cannot write {out}: {parent} does not take new folders ({e.strerror or e}); "
                            "pick another path") from e


def check_replaceable(out_dir: str | os.PathLike[str], *, force: bool = False, flag: str | None = "--force") -> Path:
    """The checks :func:`atomic_directory` makes before writing, on their own, so a long
    job (bench, demo) can refuse its output folder before it starts; returns the path.
    ``flag``: the caller's overwrite flag, for the messages (None: it has none)."""
    out = check_output_path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; remove it or pick another path")
    _check_parent(out)
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --force (force=True) to overwrite it")
    if out.exists() and not _replaceable(out):
        even = f" even with {flag}" if flag else ""
        raise ArtifactError(f"{out} exists and was not written by graphopt (no {MARKER} file); "
                            f"graphopt will not replace it{even}; pick another -o")
    foreign = foreign_files(out) if out.exists() else []
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ArtifactError(f"{out} holds files graphopt did not write ({foreign[0]}{more}); move them out "
                            f"and run again ({flag or 'graphopt'} replaces only graphopt's own output), or pick another -o")
    return out


def _umask() -> int:
    """The process umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def usual_mode(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode a plain ``mkdir`` or ``open`` would (0777 / 0666 less the umask):
    ``tempfile.mkdtemp`` / ``mkstemp`` make 0700 / 0600, which an artifact renamed into place kept,
    so another user or host's copy could not read it."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~_umask())


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike[str], *, force: bool = False, kind: str = "output",
                     later: Iterable[str] = ()) -> Iterator[Path]:
    """``with atomic_directory("out") as tmp: write files into tmp``; the folder gets :data:`MARKER`,
    which lists the files written and ``later``: top-level names (globs) graphopt adds afterwards.

    ``force`` replaces an existing folder only if graphopt wrote it (and nothing else is in it) or it
    is empty.
    """
    out = check_replaceable(out_dir, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        usual_mode(tmp)
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "created": time.time(), "files": _written(tmp),
                                              "later": list(later)}) + "\n")
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
