"""Stateful models: graphopt's own runs (optimize's reference and final check,
verify-each) leave the buffers a graph mutates as they found them."""

from __future__ import annotations

import torch

import graphopt
from graphopt.transform.state import mutated_attrs
from tests.models import Counter


def _count(prog):
    return [b.item() for b in prog.gm.buffers()]


def test_mutated_attrs_names_the_counter_buffer():
    prog = graphopt.capture(Counter().eval(), (torch.ones(2),))
    assert [t.rsplit(".", 1)[-1] for t in mutated_attrs(prog.gm.graph)] == ["count"]


def test_optimize_leaves_state_as_it_found_it():
    x = torch.ones(2)
    prog = graphopt.capture(Counter().eval(), (x,))
    start = _count(prog)
    expected = prog.copy()
    optimized, _ = graphopt.optimize(prog, "dce", verify_each=False)
    assert _count(optimized) == start and _count(prog) == start
    assert torch.equal(optimized(x)[0], expected(x)[0])


def test_verify_each_compares_like_with_like_on_a_stateful_model():
    x = torch.ones(2)
    prog = graphopt.capture(Counter().eval(), (x,))
    start = _count(prog)
    optimized, report = graphopt.optimize(prog, "dce,remove-noop", verify_each=True)  # used to blame dce
    assert [r.name for r in report.passes] == ["dce", "remove-noop"]
    assert _count(optimized) == start
