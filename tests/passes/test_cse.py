from __future__ import annotations

import torch

import graphopt
from tests.passes._helpers import assert_equivalent


def test_bert_duplicate_aranges_merged(program):
    prog = program("bert4rec:tiny")
    before = prog.op_histogram()
    optimized, report = graphopt.optimize(prog, "cse")
    rec = report.passes[0]
    assert rec.modified and rec.stats["op"] >= 3
    after = optimized.op_histogram()
    # arange(seq) + 0 is built twice for the mask: one copy of each op is left
    assert after["aten.arange.default"] == before["aten.arange.default"] - 1
    assert after["aten.add.Tensor"] < before["aten.add.Tensor"]
    assert_equivalent(prog, optimized, 1e-5)


def test_dlrm_per_table_offsets_shared(program):
    prog = program("dlrm:tiny")
    optimized, report = graphopt.optimize(prog, "cse")
    after = optimized.op_histogram()
    assert prog.op_histogram()["aten.arange.start_step"] == 4
    assert after["aten.arange.start_step"] == 1  # one offsets tensor for all four tables
    assert after["aten.slice.Tensor"] < prog.op_histogram()["aten.slice.Tensor"]
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None), (7, None)))


def test_near_miss_signed_zero_and_different_args_stay():
    class M(torch.nn.Module):
        def forward(self, x):
            # x * 0.0 and x * -0.0 differ in the sign of zero; sums over different dims differ
            return x * 0.0, x * -0.0, x.sum(0), x.sum(1)

    prog = graphopt.capture(M().eval(), torch.randn(3, 4))
    optimized, report = graphopt.optimize(prog, "cse")
    assert report.passes[0].modified is False
    assert optimized.op_histogram() == prog.op_histogram()
    pos = torch.ones(3, 4)
    a, b, _, _ = optimized(pos)
    assert torch.equal(torch.signbit(a), torch.zeros(3, 4, dtype=torch.bool))
    assert torch.equal(torch.signbit(b), torch.ones(3, 4, dtype=torch.bool))
