"""verify-each holds a pass that declares ``preserves={"shapes"}`` to it: recorded
``meta["val"]`` is compared with a fresh propagation, and the pass that lied is named.
Propagating shapes never specialises the symbols that every copy of a captured Program shares."""

from __future__ import annotations

import re

import pytest
import torch

import graphopt
from graphopt import PassFailedError, PassResult
from graphopt.ir.fx import fetch_attr
from graphopt.transform import analysis, base
from graphopt.transform.analysis import propagate_shapes
from graphopt.transform.base import Pass, available_passes, register_pass
from tests.passes._precision import calibration

aten = torch.ops.aten


class _Widens(Pass):
    """Test pass: widens the first linear (pads the weight, slices back) but keeps the old meta."""

    name = "test-widens-keeps-meta"
    preserves = frozenset({"shapes"})

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm, g = program.gm, program.gm.graph
        lin = next(n for n in g.nodes if n.target is aten.linear.default)
        w = fetch_attr(gm, str(lin.args[1].target))
        b = fetch_attr(gm, str(lin.args[2].target))
        gm.register_buffer("wide_w", torch.cat([w.detach(), torch.zeros_like(w)], 0))
        gm.register_buffer("wide_b", torch.cat([b.detach(), torch.zeros_like(b)], 0))
        with g.inserting_before(lin):
            wn, bn = g.get_attr("wide_w"), g.get_attr("wide_b")
            wide = g.call_function(aten.linear.default, (lin.args[0], wn, bn))
            back = g.call_function(aten.slice.Tensor, (wide, -1, 0, w.shape[0]))
        for n in (wn, bn, wide, back):
            n.meta.update(lin.meta)  # stale: the narrow shape
        lin.replace_all_uses_with(back)
        g.erase_node(lin)
        return PassResult(program, modified=True)


@pytest.fixture
def tiny():
    available_passes()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    return graphopt.capture(model, (torch.randn(2, 4),))


def test_shape_claim_checked_and_the_lying_pass_named(tiny, monkeypatch):
    monkeypatch.setattr(base, "_PASSES", dict(base._PASSES))
    register_pass(_Widens)
    with pytest.raises(PassFailedError) as info:
        graphopt.optimize(tiny, "test-widens-keeps-meta,remove-noop", verify_each=True)
    msg = str(info.value)
    assert msg.startswith("pass 'test-widens-keeps-meta' failed")
    assert "preserves shapes but left stale meta['val']" in msg
    assert re.search(r"linear_default records \[s\d+, 3\] float32, is \[2, 6\] float32", msg), msg


def test_honest_shape_claims_pass_and_meta_is_left_alone(tiny):
    from graphopt.transform.shape_check import stale_shapes

    before = {n.name: n.meta.get("val") for n in tiny.gm.graph.nodes}
    assert stale_shapes(tiny) == []
    assert all(n.meta.get("val") is before[n.name] for n in tiny.gm.graph.nodes)
    out, report = graphopt.optimize(tiny, "remove-noop,fold-constants,cse,dce", verify_each=True)
    assert [r.name for r in report.passes] == ["remove-noop", "fold-constants", "cse", "dce"]


def _dims(prog):
    """Per placeholder, which dims are symbolic."""
    return [[isinstance(d, torch.SymInt) for d in n.meta["val"].shape]
            for n in prog.gm.graph.nodes if n.op == "placeholder"]


def _shape_env(prog):
    val = next(n.meta["val"] for n in prog.gm.graph.nodes if n.op == "placeholder")
    return next(d for d in val.shape if isinstance(d, torch.SymInt)).node.shape_env


@pytest.fixture(scope="module")
def mixed(zoo):
    """bert4rec:tiny captured on its own (its ShapeEnv is not the session's) and its int8-mixed-bf16 form,
    whose quantize ops read bf16: torch's meta kernels of those specialise every size they touch."""
    zm = zoo("bert4rec:tiny")
    captured = zm.capture()
    q, _ = graphopt.optimize(captured, "O2,quantize-int8{max_drop=0 mixed=bf16}", calibration_data=calibration(zm))
    return captured, q


def test_propagating_an_int8_bf16_program_keeps_every_copys_symbols(mixed):
    captured, q = mixed
    assert _dims(captured) == [[True, True], [True, True]]
    propagate_shapes(q)
    assert _dims(captured.copy()) == [[True, True], [True, True]]  # was [[False, False], [True, False]]: 4 x 16
    out = next(n for n in q.gm.graph.nodes if n.op == "output").args[0][0].meta["val"]
    assert all(isinstance(d, torch.SymInt) for d in out.shape[:1])  # batch stays symbolic in the result too


def test_the_shape_claim_check_propagates_in_a_shape_env_of_its_own(mixed, monkeypatch):
    from graphopt.transform.shape_check import stale_shapes

    captured, q = mixed
    # a fake kernel that reads sizes as ints (what torch's quantize meta kernels do on bf16): its guards
    # must land in the check's own ShapeEnv, never in the one the captured Program's copies share
    monkeypatch.setattr(analysis, "fake_call", lambda target, args, kwargs: target(*args, **kwargs))
    env = _shape_env(captured)
    replacements = dict(env.replacements)
    assert stale_shapes(q, reuse=False) == []  # propagated here, not read from verify-each's cache
    assert dict(env.replacements) == replacements
    assert _dims(captured.copy()) == [[True, True], [True, True]]


def test_a_propagation_is_reused_only_for_a_program_that_reads_the_same(tiny, monkeypatch):
    """verify-each keeps each fresh propagation per process (graphopt.transform.shape_check): the
    same graph is checked against it without propagating again, stale metadata is still found, and
    a Program with the same code but a constant of another size is propagated afresh."""
    from collections import OrderedDict

    from graphopt.transform import shape_check

    monkeypatch.setattr(shape_check, "_CACHE", OrderedDict())  # what earlier tests propagated is not here
    prog = tiny.copy()
    calls = []
    real = shape_check._fresh
    monkeypatch.setattr(shape_check, "_fresh", lambda p: calls.append(p) or real(p))
    assert shape_check.stale_shapes(prog, reuse=False) == [] and len(calls) == 1
    assert shape_check.stale_shapes(prog) == [] and len(calls) == 2  # now kept
    assert shape_check.stale_shapes(prog.copy()) == [] and len(calls) == 2  # same code and constants
    lin = next(n for n in prog.gm.graph.nodes if n.target is aten.linear.default)
    recorded = lin.meta["val"]
    lin.meta["val"] = recorded.new_empty([*recorded.shape[:-1], recorded.shape[-1] + 1])
    stale = shape_check.stale_shapes(prog)
    assert len(calls) == 2 and len(stale) == 1 and stale[0].startswith(f"{lin.name} records "), stale
    lin.meta["val"] = recorded
    # the same code reading a wider weight and bias: its key differs, so it propagates
    key = shape_check.propagation_key(prog)
    for const in lin.args[1:3]:
        value = fetch_attr(prog.gm, str(const.target))
        *parent, leaf = str(const.target).split(".")
        setattr(prog.gm.get_submodule(".".join(parent)), leaf,
                torch.nn.Parameter(torch.cat([value, value]), requires_grad=False))
    assert shape_check.propagation_key(prog) != key
    stale = shape_check.stale_shapes(prog)
    assert len(calls) == 3 and any(x.startswith(f"{lin.name} records [s") and x.endswith(", 6] float32")
                                   for x in stale), stale


def test_a_symbolic_size_is_compared_by_its_example_value(tiny):
    """A recorded size that is symbolic is compared by its example value: ``2*s0`` where the
    propagation gives ``s0`` (example 2) is stale; the same size written as ``s0 + 0`` is not."""
    from graphopt.transform.shape_check import stale_shapes

    prog = tiny.copy()
    lin = next(n for n in prog.gm.graph.nodes if n.target is aten.linear.default)
    recorded = lin.meta["val"]
    batch = recorded.shape[0]
    assert isinstance(batch, torch.SymInt) and batch.node.hint == 2
    lin.meta["val"] = recorded.new_empty([batch * 2, *recorded.shape[1:]])
    stale = stale_shapes(prog, reuse=False)
    assert len(stale) == 1 and re.fullmatch(rf"{lin.name} records \[2\*s\d+, 3\] float32, is \[2, 3\] float32",
                                            stale[0]), stale
    lin.meta["val"] = recorded.new_empty([batch + 0, *recorded.shape[1:]])
    assert stale_shapes(prog, reuse=False) == []
