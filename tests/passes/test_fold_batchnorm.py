from __future__ import annotations

import torch

import graphopt
from tests.models import ConvBNTower
from tests.passes._helpers import assert_equivalent

BN = "aten._native_batch_norm_legit_no_training.default"


def test_dlrm_bottom_mlp_bn_folded(program):
    prog = program("dlrm:tiny")
    assert prog.op_histogram()[BN] == 1
    optimized, report = graphopt.optimize(prog, "fold-batchnorm,dce")
    assert report.passes[0].stats == {"linear+bn": 1}
    assert optimized.op_histogram()[BN] == 0
    assert optimized.op_histogram()["aten.linear.default"] == prog.op_histogram()["aten.linear.default"]
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None), (9, None)))


def test_vision_tower_conv_and_linear_bn_folded():
    prog = graphopt.capture(ConvBNTower().eval(), torch.randn(2, 3, 8, 8))
    optimized, report = graphopt.optimize(prog, "fold-batchnorm,dce")
    assert report.passes[0].stats == {"conv+bn": 2, "linear+bn": 1}
    assert optimized.op_histogram()[BN] == 0
    assert optimized.num_parameters() < prog.num_parameters()  # BN params and stats gone
    inputs = (torch.randn(5, 3, 10, 10),)
    torch.testing.assert_close(optimized(*inputs)[0], prog(*inputs)[0], atol=1e-5, rtol=1e-5)
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None),))


def test_near_miss_bn_after_relu_and_shared_linear():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)
            self.fc2, self.bn2 = torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)

        def forward(self, x):
            a = self.bn(torch.relu(self.fc(x)))  # relu between: no fold
            h = self.fc2(x)
            return a, self.bn2(h) + h  # linear output also read elsewhere: no fold

    prog = graphopt.capture(M().eval(), torch.randn(3, 4))
    optimized, report = graphopt.optimize(prog, "fold-batchnorm")
    rec = report.passes[0]
    assert rec.modified is False
    reasons = " | ".join(rec.declined)
    assert "is not a linear or conv" in reasons and "other users" in reasons
    assert optimized.op_histogram()[BN] == 2
