"""OUT/best: a copy of the winning artifact with a ``tune`` manifest section, swapped in atomically."""

from __future__ import annotations

import json

import graphopt
from graphopt.outputs import _exchange
from graphopt.tune.keepbest import write_best


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    assert _exchange(a, b)  # Linux renameat2(RENAME_EXCHANGE); graphopt falls back to two renames elsewhere
    assert (b / "x").read_text() == "new" and (a / "x").read_text() == "old"


def test_write_best_replaces_and_keeps_checksums(tmp_path, program):
    prog = program("dlrm:tiny")
    first = graphopt.lower(prog, "torchscript", tmp_path / "t1")
    second = graphopt.lower(prog, "torchscript", tmp_path / "t2", optimize=True)
    out = tmp_path / "out"
    out.mkdir()
    write_best(out, first.path, {"trial": 1, "pipeline": "", "key": "none @ torchscript"})
    write_best(out, second.path, {"trial": 2, "pipeline": "", "key": "none @ eager"})
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["tune"]["trial"] == 2 and manifest["options"]["optimize"] is True
    assert sorted(p.name for p in out.iterdir()) == ["best"]  # no temp or old folders left
    inputs = prog.sample_inputs(batch=4, seed=3)
    with graphopt.load(out / "best") as runner:  # verify=True: every file's sha256 still matches
        (got,) = runner(*inputs)
    (want,) = prog(*inputs)
    assert (got - want).abs().max() <= 1e-5
