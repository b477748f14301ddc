"""Audit of the passes that claim ``numerics: exact`` (part 2): state the graph mutates,
fuse-qkv's slices, remove-noop's signed zeros, and verify-each's own checks.

Tiny models, real torch.export, numerics against the eager nn.Module at 1e-5 (fp32).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt import PassFailedError, PassResult
from graphopt.errors import PostconditionError
from graphopt.metrics import allclose_report
from graphopt.transform.base import Pass, register_pass

aten = torch.ops.aten
TOL = 1e-5


def _close(actual, expected, tol=TOL):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# ------------------------------------------------ F6: no-ops on a buffer that forward updates
class _Counter(nn.Module):
    def __init__(self, how: str = "clone"):
        super().__init__()
        self.how = how
        self.register_buffer("count", torch.zeros(3))

    def forward(self, x):
        c = self.count
        before = {"clone": lambda: c.clone(), "mul": lambda: c * 1, "cast": lambda: c.to(torch.float32, copy=True),
                  "add": lambda: c - 0}[self.how]()
        self.count.add_(1)
        return x + self.count, before


@pytest.mark.parametrize("how", ["clone", "mul", "cast", "add"])
@pytest.mark.parametrize("pipeline", ["remove-noop", "O1"])
def test_f6_noop_on_mutated_buffer_is_kept(how, pipeline):
    x = torch.zeros(2, 3)
    model = _Counter(how).eval()
    eager = copy.deepcopy(model)
    prog = graphopt.capture(model, (x,))
    optimized, report = graphopt.optimize(prog, pipeline)
    rec = next(r for r in report.passes if r.name == "remove-noop")
    assert any("count is updated in place" in d for d in rec.declined)
    for _ in range(3):  # 'before' is the count before each call, not the updated buffer
        ref = eager(x)
        out = optimized(x)
        _close(out[0], ref[0])
        _close(out[1], ref[1])


def test_f6_near_miss_noops_on_a_buffer_nobody_updates_are_removed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.ones(3))

        def forward(self, x):
            return x + self.b.clone() * 1

    model = M().eval()
    prog = graphopt.capture(model, (torch.randn(2, 3),))
    optimized, report = graphopt.optimize(prog, "remove-noop")
    assert report.passes[0].stats.get("mul-one") == 1 and report.passes[0].declined == []
    x = torch.randn(2, 3)
    _close(optimized(x)[0], model(x))


@register_pass
class _AuditDropsClones(Pass):
    """Test pass: removes every clone, even of a buffer that is updated later (remove-noop's old bug)."""

    name = "test-audit-drops-clones"

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        graph = program.gm.graph
        for node in [n for n in graph.nodes if n.target is aten.clone.default]:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        return PassResult(program, modified=True)


def test_f6_verify_each_compares_outputs_copied_before_state_is_restored():
    prog = graphopt.capture(_Counter().eval(), (torch.zeros(2, 3),))
    with pytest.raises((PassFailedError, PostconditionError), match="beyond its tolerance"):
        graphopt.optimize(prog, "test-audit-drops-clones", verify_each=True)


# ------------------------------------------------ F7: weights/statistics forward mutates
class _DecayingQKV(nn.Module):
    def __init__(self, decay: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.decay = decay
        self.register_buffer("wq", torch.randn(8, 8))
        self.register_buffer("wk", torch.randn(8, 8))

    def forward(self, x):
        q, k = F.linear(x, self.wq), F.linear(x, self.wk)
        if self.decay:
            self.wq.mul_(0.5)  # decays after use
        return q, k


class _DriftingBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.bn(self.lin(x))
        self.bn.running_mean.add_(1.0)  # a hand-written statistic update in eval
        return y


@pytest.mark.parametrize("model_cls, pipeline", [(_DecayingQKV, "fuse-qkv"), (_DriftingBN, "fold-batchnorm")])
def test_f7_mutated_weights_are_not_snapshotted(model_cls, pipeline):
    x = torch.randn(4, 8)
    model = model_cls().eval()
    eager = copy.deepcopy(model)
    prog = graphopt.capture(model, (x,))
    optimized, report = graphopt.optimize(prog, pipeline)
    rec = report.passes[0]
    assert rec.stats == {} and any("updated in place" in d for d in rec.declined)
    for _ in range(3):
        ref = eager(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        _close(optimized(x)[0], ref)


def test_f7_near_miss_qkv_without_mutation_fuses():
    x = torch.randn(4, 8)
    model = _DecayingQKV(decay=False).eval()
    prog = graphopt.capture(model, (x,))
    optimized, report = graphopt.optimize(prog, "fuse-qkv")
    assert report.passes[0].stats == {"groups-merged": 1}
    for out, ref in zip(optimized(x), model(x)):
        _close(out, ref)


# ------------------------------------------------ F5, F8, F11: fuse-qkv slices
class _Siblings(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.how = nn.Linear(16, 16), nn.Linear(16, 16), how

    def forward(self, x):
        B = x.shape[0]
        if self.how == "slice":
            return self.a(x) * 2, self.b(x)[:, :2].reshape(B, -1)  # reshape traced as a view
        if self.how == "unsqueeze":
            return self.a(x) * 2, self.b(x).unsqueeze(1).flatten(2)  # [B, 1, S*16]
        return self.a(x) * 2, self.b(x).unsqueeze(1) * 2  # near miss: a view op, no view behind it


@pytest.mark.parametrize("how", ["slice", "unsqueeze"])
def test_f5_view_behind_another_view_declines_the_member(how):
    model = _Siblings(how).eval()
    prog = graphopt.capture(model, (torch.randn(2, 6, 16),))
    optimized, report = graphopt.optimize(prog, "fuse-qkv")
    rec = report.passes[0]
    assert rec.stats == {} and any("through another view" in d for d in rec.declined)
    x = torch.randn(3, 5, 16)
    for out, ref in zip(optimized(x), model(x)):
        _close(out, ref)


def test_f5_near_miss_view_op_without_a_view_behind_it_fuses():
    model = _Siblings("plain").eval()
    prog = graphopt.capture(model, (torch.randn(2, 6, 16),))
    optimized, report = graphopt.optimize(prog, "fuse-qkv")
    assert report.passes[0].stats == {"groups-merged": 1}
    x = torch.randn(3, 5, 16)
    for out, ref in zip(optimized(x), model(x)):
        _close(out, ref)


class _BroadcastBias(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1, self.w2 = nn.Parameter(torch.randn(16, 16)), nn.Parameter(torch.randn(8, 16))
        self.b1, self.b2 = nn.Parameter(torch.randn(1)), nn.Parameter(torch.randn(8))

    def forward(self, x):
        return F.linear(x, self.w1, self.b1) * 2, F.linear(x, self.w2, self.b2) * 2


def test_f8_broadcast_bias_is_expanded_before_concatenating():
    model = _BroadcastBias().eval()
    prog = graphopt.capture(model, (torch.randn(2, 5, 16),))
    optimized, report = graphopt.optimize(prog, "fuse-qkv")
    assert report.passes[0].stats == {"groups-merged": 1}
    x = torch.randn(3, 4, 16)
    for out, ref in zip(optimized(x), model(x)):
        _close(out, ref.detach())


class _QKOutputs(nn.Module):
    def __init__(self, outputs: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.outputs = nn.Linear(16, 16), nn.Linear(16, 16), outputs

    def forward(self, x):
        if self.outputs:
            return self.q(x), self.k(x)
        return self.q(x) + self.k(x)


def test_f11_fused_slices_that_are_outputs_are_contiguous(tmp_path):
    model = _QKOutputs().eval()
    prog = graphopt.capture(model, (torch.randn(2, 6, 16),))
    optimized, report = graphopt.optimize(prog, "fuse-qkv")
    assert report.passes[0].stats == {"groups-merged": 1}
    clones = [n for n in optimized.graph.nodes if n.target is aten.clone.default]
    assert len(clones) == 2 and all(n.kwargs["memory_format"] == torch.contiguous_format for n in clones)
    x = torch.randn(2, 5, 16)
    graphopt.lower(optimized, "eager", tmp_path / "eager")
    with graphopt.load(tmp_path / "eager") as runner:
        for outs in (optimized(x), runner(x)):
            assert all(o.is_contiguous() for o in outs)
            for out, ref in zip(outs, model(x)):
                _close(out.view(-1), ref.detach().view(-1))


def test_f11_near_miss_slices_read_inside_the_graph_get_no_copy():
    prog = graphopt.capture(_QKOutputs(outputs=False).eval(), (torch.randn(2, 6, 16),))
    optimized, report = graphopt.optimize(prog, "fuse-qkv")
    assert report.passes[0].stats == {"groups-merged": 1}
    assert optimized.op_histogram()["aten.clone.default"] == 0


# ------------------------------------------------ F9: x + 0 and -0.0; inf/NaN in allclose_report
class _NegZero(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x, n):
        z = x * -0.0  # -0.0 for positive x
        y = {"add": lambda: z + 0, "sub": lambda: z - 0, "addneg": lambda: z + (-0.0)}[self.how]()
        return 1.0 / y, n + 0


@pytest.mark.parametrize("how, removed", [("add", 1), ("sub", 2), ("addneg", 2)])
def test_f9_add_zero_is_removed_only_where_it_is_an_identity(how, removed):
    model = _NegZero(how).eval()
    x, n = torch.rand(2, 3) + 0.1, torch.arange(6).reshape(2, 3)
    prog = graphopt.capture(model, (x, n))
    optimized, report = graphopt.optimize(prog, "remove-noop", verify_each=True)
    assert report.passes[0].stats.get("add-zero") == removed  # integer n + 0 always goes
    out, ref = optimized(x, n), model(x, n)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])  # +inf stays +inf
    assert (ref[0] == (float("inf") if how == "add" else float("-inf"))).all()


@pytest.mark.parametrize("out, ok", [
    ([float("-inf"), 1.0], False),   # the inf's sign flipped
    ([1e30, 1.0], False),            # finite where the reference is inf
    ([float("inf"), 1.0], True),
])
def test_f9_allclose_report_inf_positions_must_match(out, ok):
    ref = torch.tensor([float("inf"), 1.0])
    assert (allclose_report([torch.tensor(out)], [ref], 1e-5) is None) is ok


@pytest.mark.parametrize("out, ok", [([1.0, 2.0], False), ([float("nan"), 2.0], True), ([2.0, float("nan")], False)])
def test_f9_allclose_report_nan_positions_must_match(out, ok):
    ref = torch.tensor([float("nan"), 2.0])
    assert (allclose_report([torch.tensor(out)], [ref], 1e-5) is None) is ok


# ------------------------------------------------ F10a/b: verify-each false positives
class _TrainDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        dead = self.unused(x)  # noqa: F841  (gives dce something to remove)
        return F.dropout(self.lin(x), 0.3, training=True)


def test_f10a_train_dropout_does_not_fail_verify_each():
    prog = graphopt.capture(_TrainDropout().eval(), (torch.randn(4, 8),))
    _, report = graphopt.optimize(prog, "remove-dropout,dce", verify_each=True)
    assert report.passes[0].stats == {} and report.passes[0].declined  # declined: changed nothing
    assert report.passes[1].stats.get("nodes-removed", 0) >= 1  # modified: same seed for both runs


class _PaddedMHA(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha, self.unused = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 16)

    def forward(self, x, pad):
        dead = self.unused(x)  # noqa: F841
        return self.mha(x, x, x, key_padding_mask=pad)


def test_f10b_dynamic_baddbmm_shapes_propagate():
    """The root of F10b: torch's baddbmm meta kernel expands with symbolic sizes and failed on a dynamic
    nn.MultiheadAttention; graphopt.ir.shapes.fake_call takes its decomposition (same shapes)."""
    from graphopt.transform.shape_check import stale_shapes

    pad = torch.zeros(2, 5, dtype=torch.bool)
    prog = graphopt.capture(_PaddedMHA().eval(), (torch.randn(2, 5, 16), pad))
    assert any("baddbmm" in str(n.target) for n in prog.gm.graph.nodes)
    assert stale_shapes(prog, reuse=False) == []


def test_f10b_pass_not_blamed_for_shapes_that_did_not_propagate_before_it():
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, -2:] = True
    model = _PaddedMHA().eval()
    prog = graphopt.capture(model, (torch.randn(2, 5, 16), pad))  # dynamic: torch's baddbmm meta fails
    optimized, report = graphopt.optimize(prog, "dce", verify_each=True)
    assert report.passes[0].stats.get("nodes-removed", 0) >= 1
    x = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, -3:] = True
    for out, ref in zip(optimized(x, pad), model(x, pad)):
        _close(out, ref.detach())
