from __future__ import annotations

import math

import pytest
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


def test_near_miss_tanh_tanh_gelu_shared_output():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c, self.d = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.d(x)
            return (torch.tanh(self.a(x)), torch.nn.functional.gelu(self.c(x), approximate="tanh"), torch.relu(h) + h)

    prog = graphopt.capture(M().eval(), torch.randn(3, 4))
    optimized, report = graphopt.optimize(prog, "fuse-linear-act")
    rec = report.passes[0]
    assert rec.modified is False
    reasons = " | ".join(rec.declined)
    assert "no fused linear+tanh kernel" in reasons
    assert "on cpu _addmm_activation computes exact gelu" in reasons
    assert "other users" in reasons
    assert optimized.op_histogram() == prog.op_histogram()


def test_linear_without_bias_fuses_with_a_zero_bias(program):
    """T5's feed-forward: ``relu(linear(x, W))`` (no bias) -> ``_addmm_activation(0, x, W.t())``."""
    prog = program("t5-rec:tiny")
    optimized, report = graphopt.optimize(prog, "fuse-linear-act,dce")
    assert report.passes[0].stats == {"linear+relu": 3}  # encoder x2, decoder x1
    after = optimized.op_histogram()
    assert after[FUSED] == 3 and after["aten.relu.default"] == 0
    assert_equivalent(prog, optimized, 1e-5)


def _new_gelu(x):  # Hugging Face NewGELUActivation (GPT-2's gelu_new), written out
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def test_written_out_tanh_gelu_is_recognised_and_declined_on_cpu(program):
    prog = program("gpt-rec:tiny")
    optimized, report = graphopt.optimize(prog, "fuse-linear-act")
    rec = report.passes[0]
    assert rec.modified is False and len(rec.declined) == 2  # c_fc -> gelu_new in each block
    assert all("gelu(tanh) written out as 0.5*x*(1+tanh(...)): on cpu _addmm_activation computes exact gelu"
               in d and ".mlp.c_fc" in d for d in rec.declined), rec.declined

    class AlmostGelu(torch.nn.Module):  # near miss: 0.04 instead of 0.044715 is not gelu
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.04 * torch.pow(h, 3.0))))

    near = graphopt.capture(AlmostGelu().eval(), torch.randn(3, 4))
    _, report = graphopt.optimize(near, "fuse-linear-act")
    assert report.passes[0].modified is False and report.passes[0].declined == []  # not even a candidate


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tanh-gelu epilogue is CUDA's (cuBLASLt); CPU declines")
def test_written_out_tanh_gelu_fused_on_cuda():
    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 32)

        def forward(self, x):
            return _new_gelu(self.fc(x))

    model = GeluMLP().eval().cuda()
    prog = graphopt.capture(model, torch.randn(3, 5, 16, device="cuda"))
    optimized, report = graphopt.optimize(prog, "fuse-linear-act,dce")
    assert report.passes[0].stats == {"linear+gelu": 1}
    assert optimized.op_histogram()["aten.tanh.default"] == 0
    x = torch.randn(2, 7, 16, device="cuda")
    torch.testing.assert_close(optimized(x)[0], model(x), atol=1e-3, rtol=1e-3)  # cuBLASLt epilogue rounding
