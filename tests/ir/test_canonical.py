"""Capture's canonical forms: addmm projections become linear; layout-dependent views copy first."""

from __future__ import annotations

import torch

import graphopt
from graphopt.ir.canonical import addmm_to_linear
from graphopt.ir.layout import guard_layout_views, layout_dependent_views

aten = torch.ops.aten


class Conv1DProjection(torch.nn.Module):
    """Hugging Face's ``Conv1D``: weight stored [in, out], ``addmm`` on the flattened input."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 12))
        self.bias = torch.nn.Parameter(torch.randn(12))
        self.alpha = alpha

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight, alpha=self.alpha)
        return out.view(x.size()[:-1] + (12,))


def _ops(program):
    return program.op_histogram()


def test_conv1d_addmm_is_captured_as_linear():
    torch.manual_seed(0)
    model = Conv1DProjection().eval()
    prog = graphopt.capture(model, torch.randn(2, 5, 8), dynamic={"x": {0: "batch", 1: "seq"}})
    ops = _ops(prog)
    assert ops["aten.linear.default"] == 1 and ops["aten.addmm.default"] == 0
    assert ops["aten.view.default"] == 0  # the flatten/unflatten views went with it
    linear = next(n for n in prog.graph.nodes if n.target is aten.linear.default)
    assert linear.args[0].op == "placeholder"  # reads x itself, rank 3
    assert "val" in linear.meta and linear.meta["nn_module_stack"]
    assert "weight" not in dict(prog.gm.named_parameters())  # the [in, out] copy is gone
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(prog(x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_addmm_near_misses_stay():
    torch.manual_seed(0)
    scaled = graphopt.capture(Conv1DProjection(alpha=2.0).eval(), torch.randn(2, 5, 8))  # alpha != 1

    class RuntimeWeight(torch.nn.Module):  # the weight is an input, not a constant
        def forward(self, x, w):
            return torch.addmm(torch.zeros(3), x, w)

    dynamic = graphopt.capture(RuntimeWeight().eval(), (torch.randn(4, 2), torch.randn(2, 3)))
    for prog in (scaled, dynamic):
        assert _ops(prog)["aten.addmm.default"] == 1 and _ops(prog)["aten.linear.default"] == 0
        assert addmm_to_linear(prog.gm) == 0


class TransposedAttentionOutput(torch.nn.Module):
    """HF's attention epilogue: SDPA, then ``transpose(1, 2).reshape(b, s, -1)`` and a projection."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
        self.bias = torch.nn.Parameter(torch.randn(4, 1, 1))  # a learned additive bias (T5-like)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 4).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.expand(4, s, s))
        return self.out(a.transpose(1, 2).reshape(b, s, -1))


def test_layout_dependent_view_copies_first_and_survives_decomposition():
    torch.manual_seed(0)
    model = TransposedAttentionOutput().eval()
    prog = graphopt.capture(model, torch.randn(2, 6, 16), dynamic={"x": {0: "batch", 1: "seq"}})
    assert layout_dependent_views(prog.gm) == []  # capture guarded them
    clones = [n for n in prog.graph.nodes if n.target is aten.clone.default
              and n.kwargs.get("memory_format") == torch.contiguous_format]
    assert len(clones) == 1 and clones[0].args[0].target is aten.transpose.int
    # the re-trace ONNX export runs: SDPA decomposed to math ops returns contiguous [b, h, s, d]
    ep = prog.export().run_decompositions()
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(ep.module()(x)[0], model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prog(x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_layout_guard_near_miss_leaves_ordinary_views():
    """Views of contiguous producers (linear outputs split into heads) are not touched."""
    prog = graphopt.capture(torch.nn.Linear(16, 16).eval(), torch.randn(2, 6, 16))
    before = _ops(prog)
    assert guard_layout_views(prog.gm) == 0
    assert _ops(prog) == before
