"""register_pass: built-ins first, name collisions, re-run cells, Option declarations."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

from graphopt.errors import GraphoptError
from graphopt.transform import base
from graphopt.transform.base import Option, Pass, PassResult, available_passes, register_pass
from graphopt.transform.pipeline import parse_pipeline


@pytest.fixture(autouse=True)
def _scratch_registry(monkeypatch):
    available_passes()
    monkeypatch.setattr(base, "_PASSES", dict(base._PASSES))  # what a test registers stays here


def _pass(pass_name, *opts, qualname="Probe"):
    cls = type(qualname, (Pass,), {"__doc__": "probe", "name": pass_name, "options": tuple(opts),
                                   "run": lambda self, program, ctx: PassResult(program, modified=False)})
    cls.__module__ = "user_cell"
    return cls


def test_custom_pass_named_like_a_builtin_before_builtins_load_is_refused():
    # a fresh interpreter: the built-ins are not loaded yet when the user registers
    code = textwrap.dedent("""
        from graphopt import Pass, PassResult, register_pass
        from graphopt.transform.base import available_passes
        from graphopt.transform.pipeline import parse_pipeline
        class MyDce(Pass):
            name = "dce"
            def run(self, program, ctx):
                return PassResult(program, modified=False)
        try:
            register_pass(MyDce)
        except Exception as e:
            print("REFUSED", e)
        ps = available_passes()
        print("DCE", ps["dce"].__module__, "N", len(ps), "O2", len(parse_pipeline("O2")) > 5)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED pass name 'dce' of __main__.MyDce is taken by the built-in pass graphopt.passes.dce" in out.stdout
    builtins = sum(base.is_builtin(c) for c in available_passes().values())
    assert f"DCE graphopt.passes.dce N {builtins} O2 True" in out.stdout


def test_builtin_name_refused_after_builtins_loaded():
    with pytest.raises(GraphoptError, match=r"^pass name 'cse' of user_cell.Probe is taken by the built-in"):
        register_pass(_pass("cse"))


def test_rerun_cell_replaces_the_earlier_class():
    first = register_pass(_pass("test-rerun-cell"))
    second = register_pass(_pass("test-rerun-cell"))  # the same cell run again: a new class object
    assert first is not second and available_passes()["test-rerun-cell"] is second


def test_another_class_under_a_taken_name_is_refused():
    register_pass(_pass("test-taken", qualname="First"))
    with pytest.raises(GraphoptError, match=r"registered twice \(user_cell.First and user_cell.Second\)"):
        register_pass(_pass("test-taken", qualname="Second"))


@pytest.mark.parametrize(("opt", "fragment"), [
    (Option("out", pathlib.Path, pathlib.Path("x")), "type Path is not supported; declare it as bool, int"),
    (Option("k", float, 1), "default 1 prints as 'k=1' which parses back as 1.0; declare the default as 1.0"),
    (Option("mode", str, "fsat", choices=("fast", "slow")), "default 'fsat' is invalid: 'fsat' is not one of"),
    (Option("word", str, "a b"), "default 'a b' is invalid: value 'a b' may not contain spaces"),
    (Option("n", int, None), "default None cannot be written in pipeline text"),
    (Option("n", int, 0, check=lambda v: "must be >= 1" if v < 1 else None), "default 0 is invalid: must be >= 1"),
])
def test_bad_option_declarations_are_refused_at_registration(opt, fragment):
    with pytest.raises(GraphoptError, match=r"^pass 'test-decl' option") as info:
        register_pass(_pass("test-decl", opt))
    assert fragment in str(info.value)
    assert "test-decl" not in available_passes()


def test_empty_string_default_round_trips():
    register_pass(_pass("test-empty-label", Option("label", str, ""), Option("k", float, 1.0)))
    p = parse_pipeline("test-empty-label")
    assert str(p) == "test-empty-label{k=1.0 label=}"
    assert parse_pipeline(str(p)) == p and p.passes[0].label == ""
    assert parse_pipeline("test-empty-label{label= k=2.0}").passes[0].config == {"label": "", "k": 2.0}
