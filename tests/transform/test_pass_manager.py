"""Pass manager: contract enforcement, instruments, failures, reproducers."""

from __future__ import annotations

import json

import pytest
import torch

import graphopt
from graphopt import PassFailedError, PassResult, Program
from graphopt.errors import GraphoptError
from graphopt.transform.base import Pass, register_pass
from graphopt.transform.manager import PassContext, PassManager

aten = torch.ops.aten


@register_pass
class _BreaksNumerics(Pass):
    """Test pass: doubles the first linear's output (a wrong rewrite)."""

    name = "test-breaks-numerics"

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        graph = program.gm.graph
        node = next(n for n in graph.nodes if n.target is aten.linear.default)
        with graph.inserting_after(node):
            doubled = graph.call_function(aten.mul.Tensor, (node, 2.0))
        node.replace_all_uses_with(doubled, delete_user_cb=lambda u: u is not doubled)
        return PassResult(program, modified=True)


@register_pass
class _LiesAboutModified(Pass):
    """Test pass: erases a dropout clone but reports modified=False."""

    name = "test-lies-about-modified"

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        graph = program.gm.graph
        node = next(n for n in graph.nodes if n.target is aten.clone.default)
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        return PassResult(program, modified=False)


@register_pass
class _Raises(Pass):
    """Test pass: raises like a buggy pass would."""

    name = "test-raises"

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        raise KeyError("boom")


@register_pass
class _ClaimsShapes(Pass):
    """Test pass: adds a node without meta['val'] but claims to preserve shapes."""

    name = "test-claims-shapes"
    preserves = frozenset({"shapes"})

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        graph = program.gm.graph
        node = next(n for n in graph.nodes if n.target is aten.linear.default)
        with graph.inserting_after(node):
            same = graph.call_function(aten.mul.Tensor, (node, 1.0))
        node.replace_all_uses_with(same, delete_user_cb=lambda u: u is not same)
        return PassResult(program, modified=True)


@register_pass
class _NeedsData(Pass):
    """Test pass: requires calibration data."""

    name = "test-needs-data"
    requires = frozenset({"calibration_data"})

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        return PassResult(program, modified=False, stats={"batches": len(ctx.calibration_batches())})


def test_verify_each_catches_wrong_numerics(program):
    with pytest.raises(PassFailedError, match="test-breaks-numerics.*beyond its tolerance"):
        graphopt.optimize(program("bert4rec:tiny"), "remove-dropout,test-breaks-numerics", verify_each=True)


def test_failure_names_pass_and_predecessors(program):
    with pytest.raises(PassFailedError) as info:
        graphopt.optimize(program("bert4rec:tiny"), "remove-dropout,dce,test-raises")
    msg = str(info.value)
    assert "pass 'test-raises' failed" in msg
    assert "passes before it: remove-dropout, dce" in msg
    assert "KeyError" in msg


def test_untruthful_modified_is_caught(program):
    with pytest.raises(PassFailedError, match="modified=False but changed the graph"):
        graphopt.optimize(program("bert4rec:tiny"), "test-lies-about-modified", verify_each=True)


def test_preserves_shapes_claim_is_checked_on_result(program):
    with pytest.raises(PassFailedError, match="preserves shapes but left nodes without"):
        graphopt.optimize(program("bert4rec:tiny"), "test-claims-shapes")


def test_requires_calibration_data(program):
    with pytest.raises(PassFailedError, match="needs calibration data"):
        graphopt.optimize(program("dlrm:tiny"), "test-needs-data")
    prog = program("dlrm:tiny")
    _, report = graphopt.optimize(prog, "test-needs-data", calibration_data=[prog.sample_inputs(seed=i) for i in range(3)])
    assert report.passes[0].stats == {"batches": 3}


def test_reproducer_is_saved_and_loadable(tmp_path, program):
    with pytest.raises(PassFailedError, match="reproducer in"):
        graphopt.optimize(program("dlrm:tiny"), "dce,test-raises", reproducer_dir=str(tmp_path / "repro"))
    meta = json.loads((tmp_path / "repro" / "reproducer.json").read_text())
    assert meta["failing_pass"] == "test-raises"
    assert meta["passes_before"] == ["dce"]
    reloaded = Program.load(tmp_path / "repro" / "input.pt2")
    assert reloaded.num_parameters() > 0


def test_report_records_time_ops_and_params(program):
    prog = program("bert4rec:tiny")
    optimized, report = graphopt.optimize(prog, "remove-dropout,dce")
    rec = report.passes[0]
    assert rec.name == "remove-dropout" and rec.modified
    assert rec.ops_delta() == {"aten.clone.default": -5}
    assert rec.time_s > 0
    assert report.drift["max_abs"] <= 1e-6
    assert report.params_before == report.params_after == prog.num_parameters()
    text = report.render()
    assert "remove-dropout" in text and "clone -5" in text
    assert optimized.pipeline == "remove-dropout,dce"
    # input Program untouched (5 dropout clones + capture's 2 layout guards, one per attention)
    assert prog.op_histogram()["aten.clone.default"] == 7


def test_shape_analysis_is_cached_and_invalidated(program):
    prog = program("bert4rec:tiny")
    ctx = PassContext(example_inputs=prog.sample_inputs())
    calls = []
    import graphopt.transform.analysis as analysis

    original = analysis.ANALYSES["shapes"]
    analysis.ANALYSES["shapes"] = lambda p: calls.append(1) or original(p)
    try:
        # a captured Program arrives with fresh meta["val"]: nothing to recompute
        PassManager("remove-noop,remove-noop").run(prog, ctx)
        assert len(calls) == 0
        # test-breaks-numerics preserves nothing: the next remove-noop recomputes, once
        ctx = PassContext(example_inputs=prog.sample_inputs())
        PassManager("test-breaks-numerics,remove-noop,remove-noop", verify_each=False).run(prog, ctx)
        assert len(calls) == 1
    finally:
        analysis.ANALYSES["shapes"] = original


def test_print_after_change_instrument(program):
    from graphopt.transform.instruments import PrintAfterChangeInstrument

    seen: list[str] = []
    PassManager("remove-dropout,dce", instruments=[PrintAfterChangeInstrument(seen.append)]).run(
        program("bert4rec:tiny")
    )
    assert len(seen) == 1 and seen[0].startswith("// after remove-dropout")


def test_optimize_captures_plain_module():
    from tests.models import MLP

    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 8)
    optimized, report = graphopt.optimize(model, "O1", example_inputs=(x,))
    assert optimized.op_histogram().get("aten.clone.default", 0) == 0
    torch.testing.assert_close(optimized(x)[0], model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(GraphoptError, match="needs example_inputs"):
        graphopt.optimize(model, "O1")
