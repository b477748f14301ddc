"""Audit of the passes that claim ``numerics: exact``: fuse-attention and verify-each's tolerance.

Every model is tiny and captured with the real torch.export; numerics are checked against the
eager nn.Module at 1e-5 (fp32). State, fuse-qkv, fold-batchnorm and remove-noop findings are in
test_exact_passes_audit_2.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import graphopt
from graphopt import PassFailedError, PassResult
from graphopt.errors import PostconditionError
from graphopt.transform.base import Pass, register_pass
from graphopt.transform.instruments import REASSOC_CAP, _reassociation_floor

aten = torch.ops.aten
SDPA = "aten.scaled_dot_product_attention.default"
TOL = 1e-5


def _close(actual, expected, tol=TOL):
    actual = actual[0] if isinstance(actual, (tuple, list)) else actual
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def _sdpa_nodes(program):
    return [n for n in program.graph.nodes if n.target is aten.scaled_dot_product_attention.default]


# ------------------------------------------------ F1: a scale above baddbmm also scales the bias
class _ScaledBaddbmm(nn.Module):
    def __init__(self, scale_q: bool = False):
        super().__init__()
        self.scale_q = scale_q

    def forward(self, q, k, v, bias):  # q, k, v: [N, S, 8]; bias: [N, S, S]
        c = 1 / math.sqrt(8)
        if self.scale_q:  # nn.MultiheadAttention's form: only q @ k^T is scaled
            s = torch.baddbmm(bias, q * c, k.transpose(1, 2))
        else:
            s = torch.baddbmm(bias, q, k.transpose(1, 2)) * c
        return torch.bmm(s.softmax(-1), v)


def _bmm_inputs(n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (*(torch.randn(n, s, 8, generator=g) for _ in range(3)), torch.randn(n, s, s, generator=g) * 2)


def test_f1_scale_on_baddbmm_result_is_declined():
    model = _ScaledBaddbmm().eval()
    prog = graphopt.capture(model, _bmm_inputs(4, 6))
    optimized, report = graphopt.optimize(prog, "fuse-attention")
    rec = report.passes[0]
    assert rec.stats == {} and len(rec.declined) == 1 and "baddbmm" in rec.declined[0]
    assert not _sdpa_nodes(optimized)
    for shape in ((4, 6), (2, 9)):
        x = _bmm_inputs(*shape, seed=3)
        _close(optimized(*x), model(*x))


def test_f1_near_miss_scale_on_q_with_baddbmm_still_fuses():
    model = _ScaledBaddbmm(scale_q=True).eval()
    prog = graphopt.capture(model, _bmm_inputs(4, 6))
    optimized, report = graphopt.optimize(prog, "fuse-attention")
    assert report.passes[0].stats == {"attention-blocks": 1}
    (sdpa,) = _sdpa_nodes(optimized)
    assert sdpa.kwargs["scale"] == pytest.approx(1 / math.sqrt(8))
    x = _bmm_inputs(2, 9, seed=3)
    _close(optimized(*x), model(*x))


# ------------------------------------------------ F2: finite_mask_fill only for fills that underflow
class _MaskedFill(nn.Module):
    def __init__(self, fill: float):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, m):  # [B, H, S, 8], m bool [B, 1, S, S]
        return (q @ k.transpose(-2, -1) * 0.35).masked_fill(m, self.fill).softmax(-1) @ v


def _masked_inputs(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, 1, s, s, generator=g) < 0.3
    m[..., 0] = False  # no fully masked rows: there SDPA differs on purpose (documented)
    return (*(torch.randn(b, 2, s, 8, generator=g) for _ in range(3)), m)


@pytest.mark.parametrize("fill", [-1.0, 0.0, -9999.0])
def test_f2_finite_fill_above_threshold_is_declined(fill):
    model = _MaskedFill(fill).eval()
    prog = graphopt.capture(model, _masked_inputs(2, 6))
    optimized, report = graphopt.optimize(prog, "fuse-attention{finite_mask_fill=true}")
    rec = report.passes[0]
    assert rec.stats == {} and "above -1e4" in rec.declined[0]
    x = _masked_inputs(3, 7, seed=1)
    _close(optimized(*x), model(*x))


@pytest.mark.parametrize("fill", [-1e4, -1e9])
def test_f2_near_miss_fill_that_underflows_fuses(fill):
    model = _MaskedFill(fill).eval()
    prog = graphopt.capture(model, _masked_inputs(2, 6))
    optimized, report = graphopt.optimize(prog, "fuse-attention{finite_mask_fill=true}")
    assert report.passes[0].stats == {"attention-blocks": 1}
    x = _masked_inputs(3, 7, seed=1)
    _close(optimized(*x), model(*x))
    # without the option, finite fills stay declined (rows with every key masked differ)
    _, plain = graphopt.optimize(prog, "fuse-attention")
    assert plain.passes[0].stats == {} and "finite_mask_fill" in plain.passes[0].declined[0]


# ------------------------------------------------ F3: scale <= 0 (ONNX's SDPA takes sqrt(scale))
class _Scaled(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v


def _qkv(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, 2, s, 8, generator=g) for _ in range(3))


@pytest.mark.parametrize("scale", [-0.3, 0.3])
def test_f3_negative_scale_declined_and_onnxruntime_matches(tmp_path, scale):
    model = _Scaled(scale).eval()
    prog = graphopt.capture(model, _qkv(2, 6))
    optimized, report = graphopt.optimize(prog, "fuse-attention")
    rec = report.passes[0]
    if scale < 0:
        assert rec.stats == {} and "not positive" in rec.declined[0]
    else:  # near miss: a positive scale fuses
        assert rec.stats == {"attention-blocks": 1}
    graphopt.lower(optimized, "onnxruntime", tmp_path / "ort")
    x = _qkv(3, 5, seed=2)
    with graphopt.load(tmp_path / "ort") as runner:
        out = runner(*x)[0]
    assert not out.isnan().any()
    _close(out, model(*x))
    _close(optimized(*x), model(*x))


# ------------------------------------------------ F4: 3-D (bmm) attention lowers to onnxruntime
class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]  # need_weights=True (default): the bmm/baddbmm form


def test_f4_multihead_attention_o2_lowers_to_onnxruntime(tmp_path):
    model = _MHA().eval()
    prog = graphopt.capture(model, (torch.randn(2, 6, 32),))
    optimized, report = graphopt.optimize(prog, "O2")
    rec = next(r for r in report.passes if r.name == "fuse-attention")
    assert rec.stats == {"attention-blocks": 1}
    (sdpa,) = _sdpa_nodes(optimized)
    assert all(a.meta["val"].dim() == 4 for a in sdpa.args[:3])  # exporters take only 4-D q/k/v
    assert optimized.op_histogram()["aten.squeeze.dim"] >= 1
    graphopt.lower(optimized, "onnxruntime", tmp_path / "ort")
    x = torch.randn(3, 5, 32)
    with graphopt.load(tmp_path / "ort") as runner:
        _close(runner(x)[0], model(x).detach())
    _close(optimized(x), model(x).detach())


class _BmmAttention(nn.Module):
    def forward(self, q, k, v, mask):  # [N, S, 8]; an additive 3-D mask [N, S, S]
        return torch.bmm((torch.bmm(q, k.transpose(1, 2)) * 0.3 + mask).softmax(-1), v)


def test_f4_hand_written_3d_attention_with_mask_is_a_4d_sdpa(tmp_path):
    model = _BmmAttention().eval()
    prog = graphopt.capture(model, _bmm_inputs(4, 6))
    optimized, report = graphopt.optimize(prog, "fuse-attention,dce")
    assert report.passes[0].stats == {"attention-blocks": 1}
    (sdpa,) = _sdpa_nodes(optimized)
    assert [a.meta["val"].dim() for a in sdpa.args[:4]] == [4, 4, 4, 4]
    x = _bmm_inputs(2, 9, seed=4)
    _close(optimized(*x), model(*x))
    graphopt.lower(optimized, "onnxruntime", tmp_path / "ort")
    with graphopt.load(tmp_path / "ort") as runner:
        _close(runner(*x)[0], model(*x))


# ------------------------------------------------ F10c: verify tolerance vs reassociation
class _Sharp(nn.Module):
    def forward(self, q, k, v):  # large logits: q*3 becomes scale=3, k*3 stays on k
        return ((q * 3) @ (k * 3).transpose(-2, -1)).softmax(-1) @ v


def _sharp_inputs(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, s, 8, generator=g) * 2, torch.randn(b, 4, s, 8, generator=g) * 2,
            torch.randn(b, 4, s, 8, generator=g))


@pytest.mark.parametrize("seq", [64, 200])
def test_f10c_verify_each_accepts_sdpa_reassociation_over_long_rows(seq):
    prog = graphopt.capture(_Sharp().eval(), _sharp_inputs(2, seq))
    floor = _reassociation_floor(prog.graph.nodes)
    assert 1e-5 < floor <= REASSOC_CAP
    _, report = graphopt.optimize(prog, "fuse-attention", verify_each=True)
    assert report.passes[0].stats == {"attention-blocks": 1}


@register_pass
class _AuditOffByOnePermille(Pass):
    """Test pass: scales the first softmax's output by 1.002 (a wrong rewrite, 0.1% off)."""

    name = "test-audit-off-by-permille"

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        graph = program.gm.graph
        node = next(n for n in graph.nodes if n.target is aten._softmax.default or n.target is aten.softmax.int)
        with graph.inserting_after(node):
            scaled = graph.call_function(aten.mul.Tensor, (node, 1.002))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
        return PassResult(program, modified=True)


def test_f10c_near_miss_verify_each_still_catches_small_real_errors():
    prog = graphopt.capture(_Sharp().eval(), _sharp_inputs(2, 200))
    with pytest.raises((PassFailedError, PostconditionError), match="beyond its tolerance"):
        graphopt.optimize(prog, "test-audit-off-by-permille", verify_each=True)
    # and F1's error (0.2 - 2) with the bias scale lost is far above the cap
    assert REASSOC_CAP <= 1e-3
