from __future__ import annotations

import torch

import graphopt
from graphopt.transform.analysis import count_flops


def test_flops_count_linear_and_cpu_attention():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            q = self.proj(x).view(2, 4, 64, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    prog = graphopt.capture(Attn(), torch.randn(2, 64, 8), dynamic=False)
    linear = 2 * (2 * 64) * 8 * 8
    attention = 2 * (2 * 4 * 64 * 64 * 2) * 2  # QK^T and PV, 2 flops per MAC
    assert count_flops(prog) == linear + attention
