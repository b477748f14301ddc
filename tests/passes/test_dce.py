from __future__ import annotations

import torch

import graphopt
from tests.passes._helpers import assert_equivalent

aten = torch.ops.aten


def test_dce_removes_dead_nodes_and_their_weights(program):
    prog = program("bert4rec:tiny")
    graph = prog.gm.graph
    anchor = next(n for n in graph.nodes if n.target is aten.linear.default)
    with graph.inserting_after(anchor):
        dead = graph.call_function(aten.relu.default, (anchor,))
    with graph.inserting_after(dead):
        graph.call_function(aten.mul.Tensor, (dead, 3.0))
    prog.gm.recompile()
    before_nodes = len(graph.nodes)
    optimized, report = graphopt.optimize(prog, "dce")
    assert report.passes[0].stats == {"nodes-removed": 2}
    assert len(optimized.graph.nodes) == before_nodes - 2
    assert_equivalent(prog, optimized, 1e-5)


def test_dce_drops_unused_weights():
    from tests.models import MLP

    model = MLP().eval()
    prog = graphopt.capture(model, torch.randn(3, 8))
    out = next(n for n in prog.graph.nodes if n.op == "output")
    fc2 = next(n for n in prog.graph.nodes if n.target is aten.linear.default and "fc2" in n.args[1].target)
    relu = next(n for n in prog.graph.nodes if n.target is aten.relu.default)
    out.args = ((relu,),)  # make fc2 dead: its weight must disappear from the saved Program
    prog.gm.recompile()
    params_before = sum(p.numel() for p in prog.gm.parameters())
    optimized, report = graphopt.optimize(prog, "dce", verify_each=False)
    assert fc2.name not in {n.name for n in optimized.graph.nodes}
    assert report.passes[0].modified
    assert sum(p.numel() for p in optimized.gm.parameters()) == params_before - (16 * 4 + 4)
    assert optimized.num_parameters() == 8 * 16 + 16


def test_dce_near_miss_keeps_asserts_and_guards(program):
    prog = program("bert4rec:tiny")
    optimized, report = graphopt.optimize(prog, "dce")
    assert report.passes[0].modified is False
    assert optimized.op_histogram()["aten._assert_tensor_metadata.default"] == 3
    assert any(n.op == "call_module" for n in optimized.graph.nodes)
