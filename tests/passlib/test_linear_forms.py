"""as_linears: constant-weight GEMMs (_addmm_activation, addmm, mm, matmul) become
aten.linear (+ relu/gelu), exactly; scaled or computed-weight GEMMs are left alone."""

from __future__ import annotations

import torch
from torch import nn

import graphopt
from graphopt.passlib.linear_forms import as_linears

aten = torch.ops.aten


class Gemms(nn.Module):
    """GPT-2's Conv1D (addmm by a stored [in, out] weight), x @ W, a fused linear+relu, and
    attention-like products of two computed tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in_out = nn.Parameter(torch.randn(8, 6))
        self.b = nn.Parameter(torch.randn(6))
        self.w_mm = nn.Parameter(torch.randn(6, 5))
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.b, x, self.w_in_out)  # Conv1D
        h = h @ self.w_mm  # matmul by a constant
        h = torch.relu(self.fc(h))
        return h @ h.t()  # computed x computed


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_constant_weight_gemms_become_linears_exactly(monkeypatch):
    import graphopt.ir.capture as capture_module
    from graphopt.ir.layout import guard_layout_views

    x = torch.randn(7, 8)
    # capture itself turns addmm into linear (graphopt.ir.canonical); a Program from another
    # path (an older saved one) may still hold addmm, which is what as_linears must handle
    monkeypatch.setattr(capture_module, "canonicalize", guard_layout_views)
    p = graphopt.capture(Gemms().eval(), (x,))
    fused, _ = graphopt.optimize(p, "fuse-linear-act")  # linear + relu -> _addmm_activation
    assert aten._addmm_activation.default in _ops(fused.gm)
    gm = fused.copy().gm
    counts, declined = as_linears(gm)
    assert counts == {"addmm": 1, "matmul": 1, "_addmm_activation": 1}
    assert declined == []  # the h @ h.t() product is left to find_linears to report
    ops = _ops(gm)
    assert ops.count(aten.linear.default) == 3 and ops.count(aten.relu.default) == 1
    assert aten.addmm.default not in ops and aten._addmm_activation.default not in ops
    assert ops.count(aten.matmul.default) + ops.count(aten.mm.default) == 1  # the computed one
    gm.graph.lint()
    torch.testing.assert_close(gm(x), fused.gm(x), atol=1e-5, rtol=1e-5)  # exact up to summation order


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, x, self.w, beta=0.5)


def test_scaled_addmm_is_a_near_miss_with_a_reason():
    p = graphopt.capture(Scaled().eval(), (torch.randn(3, 8),))
    gm = p.copy().gm
    counts, declined = as_linears(gm)
    assert counts == {} and len(declined) == 1 and "beta/alpha" in declined[0]
    assert aten.addmm.default in _ops(gm)
    counts, _ = as_linears(gm, skip=["*"])  # skip patterns leave nodes alone, silently
    assert counts == {}
