from __future__ import annotations

import torch

import graphopt
from tests.passes._helpers import assert_equivalent

aten = torch.ops.aten


def test_bert_noops_removed(program):
    prog = program("bert4rec:tiny")
    optimized, report = graphopt.optimize(prog, "remove-noop")
    stats = report.passes[0].stats
    assert stats["full-slice"] == 3 and stats["identity-view"] == 4 and stats["add-zero"] == 2
    assert stats["clone"] == 5  # eval-mode dropout clones are no-ops too
    hist = optimized.op_histogram()
    assert hist["aten.slice.Tensor"] == prog.op_histogram()["aten.slice.Tensor"] - 3
    assert_equivalent(prog, optimized, 1e-5)


def test_rules_on_a_hand_written_model():
    class M(torch.nn.Module):
        def forward(self, x):
            a = x.view(x.shape[0], 8)          # identity view
            b = a.to(torch.float32)            # same-dtype cast
            c = b[:, 0:]                        # full slice
            d = (c * 1) - 0                     # mul-one, add-zero (x - 0: an identity for floats)
            e = d + 0                           # near miss: + 0 turns -0.0 into +0.0 on floats, so it stays
            return e.reshape(-1, 4)             # a real reshape: must stay

    prog = graphopt.capture(M(), torch.randn(3, 8))
    optimized, report = graphopt.optimize(prog, "remove-noop")
    stats = report.passes[0].stats
    assert stats.get("identity-view") == 1
    assert stats.get("full-slice") == 1
    assert stats.get("mul-one") == 1 and stats.get("add-zero") == 1
    hist = optimized.op_histogram()
    assert hist["aten.view.default"] == 1  # the real reshape
    assert hist["aten.add.Tensor"] == 1  # the float + 0
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None),))


def test_near_miss_real_views_and_casts_stay():
    class M(torch.nn.Module):
        def forward(self, x):
            return x.view(-1).to(torch.float64) * 2 + 1, x[1:]

    prog = graphopt.capture(M(), torch.randn(3, 8))
    before = prog.op_histogram()
    optimized, report = graphopt.optimize(prog, "remove-noop")
    assert report.passes[0].modified is False
    assert optimized.op_histogram() == before
