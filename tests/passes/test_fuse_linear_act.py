from __future__ import annotations

import torch

import graphopt
from tests.passes._helpers import assert_equivalent

FUSED = "aten._addmm_activation.default"


def test_bert4rec_linear_gelu_fused(program):
    prog = program("bert4rec:tiny")
    optimized, report = graphopt.optimize(prog, "fuse-linear-act,dce")
    assert report.passes[0].stats == {"linear+gelu": 3}  # 2 FFN intermediates + the MLM transform
    after = optimized.op_histogram()
    assert after[FUSED] == 3 and after["aten.gelu.default"] == 0
    assert_equivalent(prog, optimized, 1e-5)


def test_dlrm_linear_relu_fused_after_bn_folding(program):
    prog = program("dlrm:tiny")
    optimized, report = graphopt.optimize(prog, "fold-batchnorm,fuse-linear-act,dce")
    assert report.passes[1].stats == {"linear+relu": 3}  # bottom (BN folded) x2 + top x1
    assert optimized.op_histogram()["aten.relu.default"] == 0
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None), (6, None)))


def test_near_miss_tanh_tanh_gelu_no_bias_shared_output():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, bias=False)
            self.c, self.d = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.d(x)
            return (torch.tanh(self.a(x)), torch.relu(self.b(x)),
                    torch.nn.functional.gelu(self.c(x), approximate="tanh"), torch.relu(h) + h)

    prog = graphopt.capture(M().eval(), torch.randn(3, 4))
    optimized, report = graphopt.optimize(prog, "fuse-linear-act")
    rec = report.passes[0]
    assert rec.modified is False
    reasons = " | ".join(rec.declined)
    assert "no fused linear+tanh kernel" in reasons
    assert "no bias" in reasons
    assert "on cpu _addmm_activation computes exact gelu" in reasons
    assert "other users" in reasons
    assert optimized.op_histogram() == prog.op_histogram()
