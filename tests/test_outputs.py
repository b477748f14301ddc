"""graphopt.outputs: atomic folders, --force replaces only what graphopt wrote, precious paths refused."""

from __future__ import annotations

import os
import stat

import pytest

from graphopt.errors import ArtifactError
from graphopt.outputs import MARKER, atomic_directory, check_output_path, written_by_graphopt


def test_writes_atomically_with_marker(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing visible until the block ends
    assert (out / "a.txt").read_text() == "1" and (out / MARKER).is_file() and written_by_graphopt(out)


def test_force_replaces_graphopt_folders_and_empty_ones_only(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ArtifactError, match="already exists; pass --force"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, force=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty, force=True) as tmp:
        (tmp / "c.txt").write_text("3")
    assert (empty / "c.txt").is_file()
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not written by graphopt"):
        with atomic_directory(user, force=True):
            raise AssertionError("must not be reached")
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


def test_failure_mid_write_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("lowering failed")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left behind


def test_precious_paths_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in (".", "/", "~", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(ArtifactError, match="refusing to write output"):
            check_output_path(bad)
    import graphopt

    checkout = os.path.dirname(os.path.dirname(graphopt.__file__))
    with pytest.raises(ArtifactError, match="refusing"):
        check_output_path(checkout)
    assert check_output_path(tmp_path / "fresh") == tmp_path / "fresh"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        with atomic_directory(tmp_path / "file", force=True):
            pass


def test_outputs_get_the_modes_mkdir_and_open_give(tmp_path, program):
    """Was: 0700 folders and 0600 Program files (tempfile's modes, kept by the rename into place), so a
    folder copied to another host or read by another user (a stage rank, a serving account) failed."""
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
        saved = program("dlrm:tiny").save(tmp_path / "out2" / "p.pt2")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE(saved.stat().st_mode) == 0o644
