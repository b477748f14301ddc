"""Audit of the approximate passes (s27): accuracy guard target, calibration data checks, degenerate
calibration ranges, prune-heads masks and negative slices, skip= patterns that match nothing,
prune-embeddings option refusals and a bias added first, quantize-int8-weights on ``x @ W``.

Tiny models captured with graphopt.capture; numerics against eager (and the lowered runtimes) with the
tolerance stated at each check; the pass report says what was changed, declined and why."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import RunnerError
from graphopt.passlib.accuracy_guard import target_for

torch.manual_seed(0)


def _mlp(out: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, out)).eval()


def _calib(n: int = 8, rows: int = 16) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 16, generator=g),) for _ in range(n)]


def _lowered(prog, inputs, tmp_path, runtimes=("eager", "torchscript", "onnxruntime")):
    """``{runtime: [first output per input tuple]}`` from the lowered artifact."""
    out = {}
    for rt in runtimes:
        if rt == "onnxruntime":
            pytest.importorskip("onnxruntime")
        path = tmp_path / rt
        graphopt.lower(prog, rt, str(path))
        runner = graphopt.load(str(path))
        out[rt] = [runner(*x)[0] if isinstance(runner(*x), (tuple, list)) else runner(*x) for x in inputs]
    return out


# ------------------------------------------------ finding 3: topk_overlap on <= k columns
def test_guard_topk_overlap_on_narrow_output_falls_back_to_cosine(tmp_path):
    m = _mlp(8)  # 8 columns: top-10 overlap of 8 columns is 1.0 whatever the values
    prog = graphopt.capture(m, (torch.randn(2, 16),))
    # a bad calibration (median clipping): cosine 0.59 with both layers int8
    q, rep = graphopt.optimize(prog, "quantize-int8{calibration=percentile percentile=50.01 metric=topk_overlap}",
                               calibration_data=_calib())
    r = rep.passes[-1]
    assert any("metric=topk_overlap cannot miss on an output of 8 column(s)" in n and "cosine >=" in n
               for n in r.notes), r.notes
    assert [d["quantized"] for d in r.details] == [False, False]
    assert all(d["reason"].startswith("accuracy guard:") for d in r.details)
    x = [(torch.randn(64, 16),), (torch.randn(5, 16),)]
    for rt, outs in _lowered(q, x, tmp_path).items():  # both layers float: eager's values (atol 1e-5)
        for o, xi in zip(outs, x):
            torch.testing.assert_close(o, m(*xi).detach(), atol=1e-5, rtol=1e-5, msg=rt)


def test_guard_topk_overlap_keeps_its_metric_on_a_wide_output():
    wide = [torch.randn(4, 32)]  # 32 candidates > top-10: the overlap can miss, no fallback
    t = target_for("topk_overlap", 0.01, wide)
    assert (t.metric, t.note) == ("topk_overlap", "") and t.required == pytest.approx(0.99)
    narrow = target_for("topk_overlap", 0.01, [torch.randn(4, 10)])
    assert narrow.metric == "cosine" and "cannot miss" in narrow.note
    assert target_for("ndcg", 0.01, [torch.randn(4, 10)]).metric == "ndcg"  # ndcg can miss there: kept


# ------------------------------------------------ findings 4, 5: calibration batches checked on binding
@pytest.mark.parametrize("value, batch", [(float("nan"), 2), (float("inf"), 2), (float("-inf"), 0)])
def test_non_finite_calibration_batch_is_refused(value, batch):
    prog = graphopt.capture(_mlp(), (torch.randn(2, 16),))
    cal = _calib()
    cal[batch][0][0, 3] = value
    for pipe in ("quantize-int8{calibration=minmax max_drop=0}", "quantize-int8"):
        with pytest.raises(RunnerError, match=rf"^calibration_data\[{batch}\]: input 'input' holds .*replace missing "
                                              r"values") as e:
            graphopt.optimize(prog, pipe, calibration_data=cal)
        assert "\n" not in str(e.value)


def test_large_finite_calibration_values_are_accepted():
    prog = graphopt.capture(_mlp(), (torch.randn(2, 16),))
    cal = _calib()
    cal[2][0][0, 3] = 40.0  # an outlier, not a missing value
    _, rep = graphopt.optimize(prog, "quantize-int8{calibration=minmax max_drop=0}", calibration_data=cal)
    assert rep.passes[-1].details[0]["act_range"][1] == pytest.approx(40.0)


@pytest.mark.parametrize("bad, match", [
    (lambda c: [(x.double(),) for (x,) in c], r"^calibration_data\[0\]: input 'input': expected float32, got float64"),
    (lambda c: c[:1] + [(torch.randn(4, 12),)] + c[2:], r"^calibration_data\[1\]: input 'input': dim 1 is static \(16\)"),
    (lambda c: c[:3] + [(torch.randn(4, 2, 16),)] + c[4:], r"^calibration_data\[3\]: input 'input': expected rank 2"),
])
def test_calibration_batch_of_wrong_dtype_or_shape_is_refused(bad, match):
    prog = graphopt.capture(_mlp(), (torch.randn(2, 16),))
    with pytest.raises(RunnerError, match=match):
        graphopt.optimize(prog, "quantize-int8{calibration=minmax max_drop=0}", calibration_data=bad(_calib()))


def test_calibration_batches_of_other_batch_sizes_are_accepted():
    prog = graphopt.capture(_mlp(), (torch.randn(2, 16),))  # dim 0 dynamic
    cal = [(torch.randn(rows, 16),) for rows in (3, 16, 7, 1)]
    _, rep = graphopt.optimize(prog, "quantize-int8{calibration=minmax max_drop=0}", calibration_data=cal)
    assert rep.passes[-1].stats["linear"] == 2


# ------------------------------------------------ finding 11: all-zero / constant activation ranges
def test_all_zero_calibration_range_gets_unit_scale_and_a_note(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8)).eval()  # one layer: its input is the only all-zero range
    prog = graphopt.capture(m, (torch.randn(2, 16),))
    cal = [(torch.zeros(4, 16),) for _ in range(4)]
    # verify off: randn example inputs round to the unit grid (error ~0.3 > the pass's 0.25); the note says why
    q, rep = graphopt.optimize(prog, "quantize-int8{calibration=minmax max_drop=0}", calibration_data=cal,
                               verify_each=False)
    r = rep.passes[-1]
    first = r.details[0]
    assert first["act_scale"] == pytest.approx(1.0) and first["act_zero_point"] == 128  # ORT's zero-range scale
    assert any(n.startswith("calibration: 1 activation(s) were constant") and "always 0" in n for n in r.notes), r.notes
    # integer-valued inputs sit on the unit grid: only the int8 weights' rounding is left (scale 1e-8
    # saturated every input at +-1.3e-6: the output was the bias alone)
    x = [(torch.randint(-3, 4, (6, 16)).float(),)]
    for rt, outs in _lowered(q, x, tmp_path, ("eager", "onnxruntime")).items():
        ref = m(*x[0]).detach()
        assert float((outs[0] - ref).abs().max()) < 0.1 * float(ref.abs().max()), rt


def test_varying_calibration_gives_no_constant_note():
    prog = graphopt.capture(_mlp(), (torch.randn(2, 16),))
    _, rep = graphopt.optimize(prog, "quantize-int8{calibration=minmax max_drop=0}", calibration_data=_calib())
    assert not any("constant" in n for n in rep.passes[-1].notes)
    assert rep.passes[-1].details[0]["act_scale"] < 0.1


# ------------------------------------------------ findings 6, 7: prune-heads
class Attn(nn.Module):
    """4 heads of 16; fused QKV read with a negative slice; optional [H|1, L, S] mask."""

    def __init__(self, fused=False, neg=False, mask_heads=0, view_neg=False):
        super().__init__()
        torch.manual_seed(0)
        self.H, self.hd, self.fused, self.neg, self.view_neg = 4, 16, fused, neg, view_neg
        n = self.H * self.hd
        if fused:
            self.qkv = nn.Linear(32, 3 * n)
        else:
            self.q, self.k, self.v = nn.Linear(32, n), nn.Linear(32, n), nn.Linear(32, n)
        self.o = nn.Linear(n, 32)
        self.mask_heads = mask_heads
        if mask_heads:
            self.register_buffer("bias", torch.randn(mask_heads, 1, 1))

    def forward(self, x):
        b, L, _ = x.shape
        n = self.H * self.hd
        if self.fused:
            t = self.qkv(x)
            q, k = t[..., :n], t[..., n:2 * n]
            v = t[..., -n:] if self.neg else t[..., 2 * n:]
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)

        def heads(z):
            return z.view(b, L, -1 if self.view_neg else self.H, self.hd).transpose(1, 2)
        mask = self.bias.expand(self.mask_heads, L, L) if self.mask_heads else None
        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        return self.o(a.transpose(1, 2).reshape(b, L, n))


def _heads_zeroed(model, details):
    """The model with the removed heads' output-projection columns zeroed: what pruning them computes."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for d in details:
            for h in d["removed"]:
                ref.o.weight[:, h * model.hd:(h + 1) * model.hd] = 0
    return ref


def _prune_heads(model):
    prog = graphopt.capture(model, (torch.randn(2, 5, 32),))
    return graphopt.optimize(prog, "prune-heads{ratio=0.5}")


def test_prune_heads_declines_a_per_head_3d_mask():
    model = Attn(mask_heads=4).eval()  # mask [H, L, S]: broadcast per head
    pruned, rep = _prune_heads(model)
    r = rep.passes[-1]
    assert not r.modified
    assert r.declined == ["model: attention mask has a per-head dim (4 at dim -3); heads are pruned only under a "
                          "mask shared by all heads"]
    x = (torch.randn(3, 9, 32),)
    torch.testing.assert_close(pruned(*x)[0], model(*x), atol=1e-6, rtol=1e-6)


def test_prune_heads_prunes_under_a_shared_3d_mask():
    model = Attn(mask_heads=1).eval()  # mask [1, L, S]: the same for every head (near miss)
    pruned, rep = _prune_heads(model)
    r = rep.passes[-1]
    assert r.modified and r.details[0]["kept"] == 2 and not r.declined
    ref = _heads_zeroed(model, r.details)
    for x in ((torch.randn(2, 5, 32),), (torch.randn(3, 9, 32),)):  # atol 1e-5: fp32 reassociation only
        torch.testing.assert_close(pruned(*x)[0], ref(*x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("view_neg", [False, True])
def test_prune_heads_fused_qkv_read_with_a_negative_slice(view_neg, tmp_path):
    model = Attn(fused=True, neg=True, view_neg=view_neg).eval()  # v = qkv[..., -n:]
    pruned, rep = _prune_heads(model)
    r = rep.passes[-1]
    assert r.modified and r.details[0]["kept"] == 2 and r.details[0]["of"] == 4
    w = [n for n in pruned.gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert pruned.gm.get_parameter(w[0].args[1].target).shape == (3 * 2 * 16, 32)  # 2 heads of Q, K, V rows
    ref = _heads_zeroed(model, r.details)
    x = [(torch.randn(2, 5, 32),), (torch.randn(3, 9, 32),)]
    for rt, outs in _lowered(pruned, x, tmp_path).items():  # atol 1e-5: reassociation only
        for o, xi in zip(outs, x):
            torch.testing.assert_close(o, ref(*xi).detach(), atol=1e-5, rtol=1e-5, msg=rt)


def test_prune_heads_positive_slices_prune_the_same_rows():
    neg, rep_neg = _prune_heads(Attn(fused=True, neg=True).eval())
    pos, rep_pos = _prune_heads(Attn(fused=True, neg=False).eval())  # same weights, v = qkv[..., 2n:]
    assert rep_neg.passes[-1].details[0]["removed"] == rep_pos.passes[-1].details[0]["removed"]
    x = (torch.randn(3, 9, 32),)
    torch.testing.assert_close(neg(*x)[0], pos(*x)[0], atol=1e-6, rtol=1e-6)


def test_prune_linear_names_each_call_of_a_shared_linear():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))
    prog = graphopt.capture(Twice().eval(), (torch.randn(2, 8),))
    _, rep = graphopt.optimize(prog, "prune-linear{ratio=0.5}")
    shared = [d for d in rep.passes[-1].declined if d.startswith("model.a")]
    assert len(shared) == 2 and len(set(shared)) == 2, shared
    assert all("(linear" in d and "weight is not a parameter of its own" in d for d in shared)
