"""graphopt.outputs: atomic folders, --force replaces only what graphopt wrote, precious paths refused."""

from __future__ import annotations

import os
import stat

import pytest

from graphopt.errors import ArtifactError
from graphopt.outputs import (
    MARKER,
    atomic_directory,
    check_output_path,
    check_replaceable,
    written_by_graphopt,
)


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


@pytest.mark.parametrize("named", ["report.json", "manifest.json", "demo.json", "graphopt-checkpoint.json"])
def test_a_users_folder_holding_a_file_named_like_graphopts_is_still_the_users(tmp_path, named):
    """Was: a report.json (or manifest.json, ...) made a folder graphopt's, and --force deleted the user's
    notes and photos beside it."""
    user = tmp_path / "results"
    (user / "photos").mkdir(parents=True)
    (user / named).write_text("{}")
    (user / "notes.txt").write_text("mine")
    (user / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ArtifactError, match="not written by graphopt"):
        with atomic_directory(user, force=True):
            raise AssertionError("must not be reached")
    assert sorted(p.relative_to(user).as_posix() for p in user.rglob("*")) == sorted([
        named, "notes.txt", "photos", "photos/a.jpg"])


def test_a_marker_that_lists_nothing_does_not_make_a_folder_replaceable(tmp_path):
    """Was: a .graphopt holding {} (no file list) let --force replace everything beside it."""
    user = tmp_path / "odd"
    user.mkdir()
    (user / MARKER).write_text("{}")
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not written by graphopt"):
        with atomic_directory(user, force=True):
            raise AssertionError("must not be reached")
    assert (user / "notes.txt").read_text() == "mine"


def test_only_graphopts_own_temporaries_are_taken_for_its_own(tmp_path):
    """Was: any '.*.tmp*' name counted as graphopt's, so a user's '.notes.tmp1' in a report folder was lost."""
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
    (out / ".notes.tmp1").write_text("mine")
    with pytest.raises(ArtifactError, match=r"holds files graphopt did not write \(\.notes\.tmp1\)"):
        with atomic_directory(out, force=True):
            raise AssertionError("must not be reached")
    (out / ".notes.tmp1").unlink()
    (out / ".a.tmp-ab12cd_9").mkdir()  # a temporary graphopt left (a crash mid-write): its own
    with atomic_directory(out, force=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]


def test_another_output_nested_in_a_graphopt_folder_is_not_replaced_with_it(tmp_path):
    """Was: a report the user had written into the demo's folder (-o graphopt-demo/nested) 'spoke for
    itself' and vanished when the demo ran again; a symlink to a folder was dropped silently too."""
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "report.md").write_text("1")
    with atomic_directory(out / "nested") as tmp:  # another run's output, inside this one
        (tmp / "report.md").write_text("keep")
    with pytest.raises(ArtifactError, match=r"holds files graphopt did not write \(nested/"):
        with atomic_directory(out, force=True):
            raise AssertionError("must not be reached")
    assert (out / "nested" / "report.md").read_text() == "keep"
    with atomic_directory(out / "nested", force=True) as tmp:  # near miss: that output alone is replaceable
        (tmp / "report.md").write_text("again")
    (tmp_path / "target").mkdir()
    (tmp_path / "other").mkdir()
    with atomic_directory(tmp_path / "other", force=True) as tmp:
        (tmp / "a.txt").write_text("1")
    (tmp_path / "other" / "link").symlink_to(tmp_path / "target", target_is_directory=True)
    with pytest.raises(ArtifactError, match=r"did not write \(link\)"):
        with atomic_directory(tmp_path / "other", force=True):
            raise AssertionError("must not be reached")


def test_a_nested_output_the_outer_one_wrote_is_replaced_with_it(tmp_path):
    """Near miss: a lowered runtime folder (its own marker) written inside an optimize output is listed by
    the outer marker, so --force replaces the whole output as before."""
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        with atomic_directory(tmp / "eager") as inner:
            (inner / "manifest.json").write_text("{}")
    with atomic_directory(out, force=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]


def test_an_output_under_a_file_or_an_unwritable_place_is_refused_before_any_work(tmp_path):
    """Was: -o afile/sub ran the whole job, then failed with 'FileExistsError: afile'."""
    (tmp_path / "afile").write_text("mine")
    for bad in (tmp_path / "afile" / "sub", tmp_path / "afile" / "x" / "y"):
        with pytest.raises(ArtifactError, match=r"cannot write .*afile is a file, not a folder; pick another path"):
            check_replaceable(bad)
    with pytest.raises(ArtifactError, match=r"cannot write /proc/graphopt-x: /proc does not take new folders"):
        check_replaceable("/proc/graphopt-x")
    assert check_replaceable(tmp_path / "new" / "deeper" / "out") == tmp_path / "new" / "deeper" / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe left nothing behind
