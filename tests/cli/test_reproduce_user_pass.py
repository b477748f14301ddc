"""A pipeline with the user's own passes: the reproducer records the module that
registered them, and ``graphopt reproduce DIR --import MODULE`` (the command the
failure prints) fails the same way; ``graphopt optimize --import MODULE`` runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import graphopt
from graphopt import PassFailedError
from graphopt.cli import main
from graphopt.transform import base
from graphopt.transform.base import available_passes

USER_MODULE = textwrap.dedent('''
    from graphopt import Pass, PassResult, register_pass

    @register_pass
    class Explodes(Pass):
        """Always raises."""
        name = "test-user-explodes"
        def run(self, program, ctx):
            raise ValueError("user pass went boom")

    @register_pass
    class Nothing(Pass):
        """Changes nothing."""
        name = "test-user-nothing"
        def run(self, program, ctx):
            return PassResult(program, modified=False)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    available_passes()
    monkeypatch.setattr(base, "_PASSES", dict(base._PASSES))
    name = f"userpasses_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    yield name
    sys.modules.pop(name, None)


def _cli(*args, pythonpath=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.getcwd()) if p)}
    return subprocess.run([sys.executable, "-m", "graphopt", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_reproduce_a_failure_in_a_user_pass(tmp_path, user_module):
    __import__(user_module)
    prog = graphopt.capture(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    repro = tmp_path / "repro"
    with pytest.raises(PassFailedError) as info:
        graphopt.optimize(prog, "dce,test-user-explodes", reproducer_dir=str(repro))
    expected = "pass 'test-user-explodes' failed (passes before it: dce): ValueError: user pass went boom"
    assert str(info.value) == f"{expected} (reproducer in {repro}; re-run: graphopt reproduce {repro} --import {user_module})"

    # a fresh process without the module: one line naming the module to import (was: "unknown pass", exit 2)
    plain = _cli("reproduce", str(repro))
    assert plain.returncode == 2
    assert (f"runs pass 'test-user-explodes' from module '{user_module}' ({tmp_path / 'mods' / user_module}.py); "
            f"re-run with --import {user_module}") in plain.stderr
    # the printed command, with the module's folder on PYTHONPATH: the same failure, exit 1
    again = _cli("reproduce", str(repro), "--import", user_module, pythonpath=str(tmp_path / "mods"))
    assert again.returncode == 1, again.stderr[-2000:]
    assert again.stderr.strip().splitlines()[-1] == f"graphopt: error: {expected}"


def test_optimize_import_runs_user_passes(tmp_path, user_module, capsys):
    prog = graphopt.capture(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    prog.save(tmp_path / "p.pt2")
    args = ["optimize", str(tmp_path / "p.pt2"), "-p", "test-user-nothing,dce", "-o"]
    assert main([*args, str(tmp_path / "a")]) == 2
    assert "unknown pass 'test-user-nothing'" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "b"), "--import", user_module]) == 0
    assert main([*args, str(tmp_path / "c"), "--import", "no_such_module_xyz"]) == 2
    assert "--import no_such_module_xyz: ModuleNotFoundError" in capsys.readouterr().err
