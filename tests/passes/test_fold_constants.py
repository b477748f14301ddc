from __future__ import annotations

import torch

import graphopt
from tests.models import Counter
from tests.passes._helpers import assert_equivalent


class _Consts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 6))
        self.register_buffer("table", torch.randn(8, 6))

    def forward(self, x):
        w_t = self.w.t() * 2.0                     # weight-only: folds
        pos = self.table[torch.arange(4)]          # constant arange + index: folds
        rows = torch.arange(x.shape[0]).unsqueeze(1).float()  # depends on a symbolic size: stays
        return x @ w_t + pos.sum() + rows


def test_weight_and_arange_subgraphs_folded_symbolic_ones_kept():
    prog = graphopt.capture(_Consts().eval(), torch.randn(3, 6))
    before = prog.op_histogram()
    assert before["aten.arange.default"] == 2 and before["aten.t.default"] == 1
    optimized, report = graphopt.optimize(prog, "fold-constants,dce")
    rec = report.passes[0]
    assert rec.modified and sum(rec.stats.values()) == 2
    after = optimized.op_histogram()
    assert after["aten.t.default"] == 0 and after["aten.index.Tensor"] == 0
    assert after["aten.arange.default"] == 1  # arange(s0) is not constant
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None), (5, None)))


def test_bert_transposed_item_table_folded_position_slice_kept(program):
    prog = program("bert4rec:tiny")
    optimized, report = graphopt.optimize(prog, "fold-constants,dce")
    after = optimized.op_histogram()
    assert report.passes[0].stats.get("t") == 1
    assert after["aten.t.default"] == 0
    # position_ids[:, :seq] depends on the symbolic seq: still computed
    assert any(n.target == torch.ops.aten.slice.Tensor and "position_ids" in str(n.args[0].target)
               for n in optimized.graph.nodes if n.op == "call_function" and n.args and
               isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr")
    assert_equivalent(prog, optimized, 1e-5)


def test_near_miss_input_dependent_and_growth_limit():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.ones(1, 64))

        def forward(self, x):
            big = self.b.expand(2048, 64)  # 512 KiB from 256 bytes: over max_growth_bytes=1000
            return x * torch.arange(x.shape[1]), big + x.sum()

    prog = graphopt.capture(M().eval(), torch.randn(3, 8))
    optimized, report = graphopt.optimize(prog, "fold-constants{max_growth_bytes=1000}")
    rec = report.passes[0]
    assert rec.modified is False
    assert any("max_growth_bytes" in d for d in rec.declined)
    assert optimized.op_histogram() == prog.op_histogram()


def test_buffer_the_graph_mutates_is_not_folded():
    x = torch.ones(2)
    prog = graphopt.capture(Counter().eval(), (x,))
    expected = prog.copy()
    optimized, report = graphopt.optimize(prog, "fold-constants", verify_each=False)
    assert not report.passes[0].modified  # add(count, 1) reads state: not a constant
    for _ in range(2):  # each call advances the counter, as the unoptimized Program does
        assert torch.equal(optimized(x)[0], expected(x)[0])
