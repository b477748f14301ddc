from __future__ import annotations

import pytest
import torch

import graphopt
from tests.models import MLP
from tests.passes._helpers import assert_equivalent

aten = torch.ops.aten


@pytest.mark.parametrize(("name", "clones"), [("bert4rec:tiny", 5), ("bert-cls:tiny", 6)])
def test_removes_eval_dropout_clones(program, name, clones):
    prog = program(name)
    # capture's layout guards (clone(memory_format=contiguous) before a view of SDPA's output,
    # graphopt.ir.layout) are clones too, and must stay
    guards = [n for n in prog.gm.graph.nodes if n.target is aten.clone.default and n.kwargs.get("memory_format")]
    assert prog.op_histogram()["aten.clone.default"] == clones + len(guards)
    optimized, report = graphopt.optimize(prog, "remove-dropout")
    assert report.passes[0].stats == {"eval-dropout-clone": clones}
    assert optimized.op_histogram().get("aten.clone.default", 0) == len(guards)
    assert_equivalent(prog, optimized, 1e-5)


def test_removes_aten_dropout_with_train_false():
    # run_decompositions({}) lowers dropout itself, so plant the op the way a
    # Program from another capture path would carry it
    model = MLP().eval()
    prog = graphopt.capture(model, torch.randn(5, 8))
    graph = prog.gm.graph
    relu = next(n for n in graph.nodes if n.target is aten.relu.default)
    with graph.inserting_after(relu):
        drop = graph.call_function(aten.dropout.default, (relu, 0.1, False))
    relu.replace_all_uses_with(drop, delete_user_cb=lambda u: u is not drop)
    prog.gm.recompile()
    optimized, report = graphopt.optimize(prog, "remove-dropout")
    assert report.passes[0].stats == {"dropout": 1, "eval-dropout-clone": 1}
    assert "aten.dropout.default" not in optimized.op_histogram()
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None),))


def test_near_miss_clone_outside_dropout_and_training_dropout_stay():
    class M(torch.nn.Module):
        def forward(self, x):
            return x * 2, x.clone()

    prog = graphopt.capture(M(), torch.randn(3, 4))
    graph = prog.gm.graph
    mul = next(n for n in graph.nodes if n.target is aten.mul.Tensor)
    with graph.inserting_after(mul):
        drop = graph.call_function(aten.dropout.default, (mul, 0.5, True))  # random: not an identity
    mul.replace_all_uses_with(drop, delete_user_cb=lambda u: u is not drop)
    prog.gm.recompile()
    before = prog.op_histogram()
    optimized, report = graphopt.optimize(prog, "remove-dropout", verify_each=False)
    assert report.passes[0].modified is False
    assert any("train=True" in d for d in report.passes[0].declined)
    assert optimized.op_histogram() == before


def test_mlp_dropout_module():
    model = MLP().eval()
    prog = graphopt.capture(model, torch.randn(5, 8))
    optimized, report = graphopt.optimize(prog, "remove-dropout")
    assert report.passes[0].modified
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None),))
