"""The rewrite-rule driver on its own: tiny hand-made rules on small captured graphs.

Every rewrite here is exact in float32 (relu is idempotent, ``x*1 == x``,
``2x == x+x``), so numerics are compared to eager with tolerance 0.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

import graphopt
from graphopt.errors import GraphoptError
from graphopt.ir.fx import is_op, where
from graphopt.ir.shapes import infer_val
from graphopt.transform.base import register_pass
from graphopt.transform.rewrite import Match, RewritePass, Rule, apply_rules

aten = torch.ops.aten


def _count(program, op) -> int:
    return sum(1 for n in program.graph.nodes if is_op(n, op))


def _scale(node: torch.fx.Node) -> float | None:
    """c for ``mul.Tensor(x, c)`` with a Python number c, else None."""
    if is_op(node, aten.mul.Tensor) and isinstance(node.args[0], torch.fx.Node):
        c = node.args[1]
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return float(c)
    return None


class DoubleRelu(Rule[Match]):
    """relu(relu(x)) -> relu(x); declines when the inner relu is read elsewhere."""

    name = "double-relu"

    def match(self, gm, node):
        inner = node.args[0] if is_op(node, aten.relu.default) else None
        if isinstance(inner, torch.fx.Node) and is_op(inner, aten.relu.default):
            return Match(node)
        return None

    def check(self, gm, match):
        inner = match.node.args[0]
        return None if len(inner.users) == 1 else f"inner relu {inner.name} is read elsewhere"

    def rewrite(self, gm, match):
        return {match.node: match.node.args[0]}


class AnyDoubleRelu(DoubleRelu):
    """The same rewrite without the check."""

    name = "any-double-relu"

    def check(self, gm, match):
        return None


class InPlaceDoubleRelu(DoubleRelu):
    """relu(relu(x)) -> relu(x) by editing the outer relu's input in place (no replacement)."""

    name = "in-place-double-relu"

    def check(self, gm, match):
        return None

    def rewrite(self, gm, match):
        match.node.args = (match.node.args[0].args[0],)
        return {}


class MulOne(Rule[Match]):
    """x * 1 -> x."""

    name = "mul-one"

    def match(self, gm, node):
        return Match(node) if _scale(node) == 1.0 else None

    def rewrite(self, gm, match):
        return {match.node: match.node.args[0]}


class QuadToAdds(Rule[Match]):
    """x * 4 -> (x + x) + (x + x); records what a later match sees of earlier new nodes."""

    name = "quad-to-adds"

    def __init__(self):
        self.seen: list[tuple[bool, bool]] = []  # (replacement has val, intermediate has val)

    def match(self, gm, node):
        return Match(node) if _scale(node) == 4.0 else None

    def check(self, gm, match):
        x = match.node.args[0]
        if is_op(x, aten.add.Tensor):  # the replacement made by an earlier match in this walk
            self.seen.append(("val" in x.meta, "val" in x.args[0].meta))
        return None

    def rewrite(self, gm, match):
        x = match.node.args[0]
        with gm.graph.inserting_before(match.node):
            twice = gm.graph.call_function(aten.add.Tensor, (x, x))
            out = gm.graph.call_function(aten.add.Tensor, (twice, twice))
        return {match.node: out}


class HalveMul(Rule[Match]):
    """x * c -> y + y with y = x * (c/2), for c = 4, 8, 16, ...: each rewrite makes a new match."""

    name = "halve-mul"

    def match(self, gm, node):
        c = _scale(node)
        return Match(node) if c is not None and c > 2 and c % 2 == 0 else None

    def rewrite(self, gm, match):
        x, c = match.node.args
        with gm.graph.inserting_before(match.node):
            half = gm.graph.call_function(aten.mul.Tensor, (x, c / 2))
            out = gm.graph.call_function(aten.add.Tensor, (half, half))
        return {match.node: out}


class TwiceToAdd(Rule[Match]):
    """x * 2 -> x + x."""

    name = "twice-to-add"

    def match(self, gm, node):
        return Match(node) if _scale(node) == 2.0 else None

    def rewrite(self, gm, match):
        x = match.node.args[0]
        with gm.graph.inserting_before(match.node):
            out = gm.graph.call_function(aten.add.Tensor, (x, x))
        return {match.node: out}


class AddToTwice(Rule[Match]):
    """x + x -> x * 2: undoes TwiceToAdd."""

    name = "add-to-twice"

    def match(self, gm, node):
        if is_op(node, aten.add.Tensor) and len(node.args) == 2 and node.args[0] is node.args[1]:
            return Match(node)
        return None

    def rewrite(self, gm, match):
        x = match.node.args[0]
        with gm.graph.inserting_before(match.node):
            out = gm.graph.call_function(aten.mul.Tensor, (x, 2))
        return {match.node: out}


class Relus(torch.nn.Module):
    def forward(self, x):
        a = torch.relu(torch.relu(x))        # double-relu
        b = torch.relu(torch.relu(x * 1))    # mul-one, double-relu
        inner = torch.relu(x - 1)
        c = torch.relu(inner) + inner        # inner relu read elsewhere: declined
        return a + b + c


class Quads(torch.nn.Module):
    def forward(self, x):
        return (x * 4) * 4 - x


def _capture(model: torch.nn.Module):
    return graphopt.capture(model.eval(), torch.randn(3, 5))  # batch and feature dims symbolic


def _assert_matches_eager(program, model) -> None:
    for shape in ((3, 5), (7, 2)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
        torch.testing.assert_close(program(x)[0], model(x), atol=0.0, rtol=0.0)


def test_counts_per_rule_and_structure():
    model = Relus()
    prog = _capture(model)
    relus = _count(prog, aten.relu.default)
    result = apply_rules(prog, [DoubleRelu(), MulOne()])
    assert result.modified is True
    assert result.stats == {"double-relu": 2, "mul-one": 1}
    assert _count(prog, aten.relu.default) == relus - 2
    assert prog.gm.code.count("aten.relu.default(") == relus - 2  # recompiled
    assert _scale(next(n for n in prog.graph.nodes if is_op(n, aten.sub.Tensor))) is None
    assert all(_scale(n) != 1.0 for n in prog.graph.nodes)
    prog.graph.lint()
    _assert_matches_eager(prog, model)


def test_decline_recorded_with_node_and_reason():
    prog = _capture(Relus())
    result = apply_rules(prog, [DoubleRelu()])
    outer = next(n for n in prog.graph.nodes if is_op(n, aten.relu.default)
                 and is_op(n.args[0], aten.relu.default) and len(n.args[0].users) > 1)
    inner = outer.args[0]
    assert result.declined == [f"{where(outer)}: inner relu {inner.name} is read elsewhere"]
    assert result.stats == {"double-relu": 2}


@pytest.mark.parametrize("fallback", [AnyDoubleRelu, InPlaceDoubleRelu])
def test_a_node_declined_by_one_rule_and_rewritten_by_the_next_is_not_reported(fallback):
    prog = _capture(Relus())
    result = apply_rules(prog, [DoubleRelu(), fallback()])
    assert result.declined == []
    assert result.stats == {"double-relu": 2, fallback.name: 1}


def test_nothing_matches_leaves_the_graph_untouched():
    class Plain(torch.nn.Module):
        def forward(self, x):
            inner = torch.relu(x)
            return torch.relu(inner) + inner, x * 3

    prog = _capture(Plain())
    code, names = prog.gm.code, [n.name for n in prog.graph.nodes]
    result = apply_rules(prog, [DoubleRelu(), MulOne(), QuadToAdds()])
    assert result.modified is False and result.stats == {} and result.details == []
    assert len(result.declined) == 1  # a decline alone changes nothing
    assert prog.gm.code == code and [n.name for n in prog.graph.nodes] == names


def test_new_nodes_get_meta_val_once_after_the_walk():
    model = Quads()
    prog = _capture(model)
    x = next(n for n in prog.graph.nodes if n.op == "placeholder")
    olds = [n for n in prog.graph.nodes if _scale(n) == 4.0]
    old_vals = [n.meta["val"] for n in olds]
    rule = QuadToAdds()
    result = apply_rules(prog, [rule])
    assert result.stats == {"quad-to-adds": 2}
    # during the walk: the replacement carried the old node's value, the intermediate had none yet
    assert rule.seen == [(True, False)]
    adds = [n for n in prog.graph.nodes if is_op(n, aten.add.Tensor)]
    assert len(adds) == 4
    for node in adds:
        val = node.meta["val"]
        assert isinstance(val, FakeTensor) and val.fake_mode is x.meta["val"].fake_mode
        assert val.shape == x.meta["val"].shape and val.dtype == torch.float32
        assert all(val is not old for old in old_vals)  # inferred at the end, not the carried value
    _assert_matches_eager(prog, model)


def test_one_walk_by_default_fixpoint_walks_again():
    class Eights(torch.nn.Module):
        def forward(self, x):
            return x * 8

    model = Eights()
    once = _capture(model)
    result = apply_rules(once, [HalveMul()])
    assert result.stats == {"halve-mul": 1}  # the x * 4 it created is not visited in that walk
    assert sorted(_scale(n) for n in once.graph.nodes if _scale(n)) == [4.0]

    fixed = _capture(model)
    result = apply_rules(fixed, [HalveMul()], fixpoint=True)
    assert result.stats == {"halve-mul": 2}
    assert sorted(_scale(n) for n in fixed.graph.nodes if _scale(n)) == [2.0]
    assert all("val" in n.meta for n in fixed.graph.nodes if n.op == "call_function")
    _assert_matches_eager(once, model)
    _assert_matches_eager(fixed, model)


def test_fixpoint_stops_rules_that_undo_each_other():
    class Twice(torch.nn.Module):
        def forward(self, x):
            return x * 2

    prog = _capture(Twice())
    assert apply_rules(prog, [TwiceToAdd(), AddToTwice()]).stats == {"twice-to-add": 1}
    with pytest.raises(GraphoptError, match="still rewrote the graph after 3 walks"):
        apply_rules(prog, [TwiceToAdd(), AddToTwice()], fixpoint=True, max_walks=3)


def test_dead_code_from_rewrites_goes_and_dead_code_from_before_stays():
    prog = _capture(Relus())
    graph = prog.graph
    x = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(x):
        stale = graph.call_function(aten.neg.default, (x,))
    assert infer_val(stale)
    relus = _count(prog, aten.relu.default)
    # the in-place rule leaves each inner relu dead without naming it: the final sweep removes it
    result = apply_rules(prog, [InPlaceDoubleRelu(), MulOne()])
    assert result.stats == {"in-place-double-relu": 3, "mul-one": 1}
    assert _count(prog, aten.relu.default) == relus - 2  # the third inner relu is also read by `+ inner`
    assert stale in graph.nodes
    dead = [n for n in graph.nodes if n.op in ("call_function", "get_attr") and not n.users]
    assert dead == [stale]


@register_pass
class _QuadsPass(RewritePass):
    """Test pass: x * 4 -> (x + x) + (x + x)."""

    name = "test-rewrite-quads"
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})

    def rules(self):
        return [QuadToAdds()]

    def notes(self, result):
        return [f"{result.stats.get('quad-to-adds', 0)} quads"]


def test_rewrite_pass_runs_under_the_pass_manager_contract():
    model = Quads()
    prog = _capture(model)
    optimized, report = graphopt.optimize(prog, "test-rewrite-quads", verify_each=True)
    rec = report.passes[0]
    assert rec.modified is True and rec.stats == {"quad-to-adds": 2} and rec.notes == ["2 quads"]
    assert optimized.op_histogram()["aten.add.Tensor"] == 4
    _assert_matches_eager(optimized, model)
    _, report = graphopt.optimize(optimized, "test-rewrite-quads", verify_each=True)
    assert report.passes[0].modified is False and report.passes[0].notes == ["0 quads"]
