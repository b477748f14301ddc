"""quantize-int8-weights: int8 weights with one scale per output row (weight-only),
float activations. Structure, the per-weight bound (scale / 2), numerics at the
declared tolerance (0.05, atol = rtol), near-misses."""

from __future__ import annotations

import pytest
import torch
from graphopt.passes.quantize_int8_weights import QuantizeInt8Weights

import graphopt
from graphopt.ir.fx import fetch_attr
from tests.models import ActivationMatmul
from tests.passes._helpers import assert_equivalent

TOL = QuantizeInt8Weights.tolerance


def test_structure_bound_and_numerics(program):
    ref = program("two-tower:tiny")
    q, report = graphopt.optimize(ref, "quantize-int8-weights")
    assert report.passes[0].stats == {"linear": 4}
    ops = q.op_histogram()
    assert ops["quantized_decomposed.dequantize_per_channel.default"] == 4 and ops["aten.linear.default"] == 4
    assert "quantized_decomposed.quantize_per_tensor.tensor" not in ops  # activations stay float
    linear = torch.ops.aten.linear.default
    pairs = zip((n for n in ref.graph.nodes if n.target is linear), (n for n in q.graph.nodes if n.target is linear))
    for before, after in pairs:
        original, dq = fetch_attr(ref.gm, before.args[1].target), after.args[1]
        assert dq.target is torch.ops.quantized_decomposed.dequantize_per_channel.default
        w8, scale, zp = (fetch_attr(q.gm, a.target) for a in dq.args[:3])
        assert w8.dtype == torch.int8 and bool((zp == 0).all())  # symmetric: TensorRT's weight-only form
        err = (w8.float() * scale[:, None] - original).abs()
        assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # round to nearest of max|row| / 127
    assert_equivalent(ref, q, TOL, shapes=((None, None), (9, None)))


def test_near_misses_leave_the_graph_alone():
    prog = graphopt.capture(ActivationMatmul(), (torch.randn(2, 5, 4), torch.randn(2, 5, 4)), dynamic=False)
    _, report = graphopt.optimize(prog, "quantize-int8-weights")
    assert report.passes[0].modified is False and any("computed operands" in d for d in report.passes[0].declined)
    _, report = graphopt.optimize(graphopt.capture(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),), dynamic=False),
                                  "quantize-int8-weights{skip=*}")
    assert report.passes[0].modified is False and any("matched skip" in d for d in report.passes[0].declined)


class _TiedHead(torch.nn.Module):
    """Scores items against the embedding table itself (GPT-style weight tying), as a tied
    ``nn.Linear`` or as ``h @ table.t()``."""

    def __init__(self, form: str):
        super().__init__()
        self.form, self.emb, self.mix = form, torch.nn.Embedding(300, 16), torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 300, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.relu(self.mix(self.emb(ids).mean(1)))
        return self.head(h) if self.form == "linear" else h @ self.emb.weight.t()


def _stored_bytes(program) -> int:
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in (fetch_attr(program.gm, str(n.target)) for n in program.graph.nodes if n.op == "get_attr")}
    return sum(tensors.values())


@pytest.mark.parametrize("form", ["linear", "matmul"])
def test_a_head_tied_to_its_embedding_is_quantized_once_for_both(form, tmp_path):
    # was: the head got an int8 copy while the lookup kept the fp32 table (more bytes, not fewer)
    torch.manual_seed(0)
    ref = graphopt.capture(_TiedHead(form).eval(), (torch.randint(0, 300, (2, 5)),))
    q, report = graphopt.optimize(ref, "quantize-int8-weights")
    assert report.passes[0].stats["linear"] == 2 and report.passes[0].stats["tied-lookup"] == 1
    ops = q.op_histogram()
    assert ops["quantized_decomposed.dequantize_per_channel.default"] == 2
    lookup = next(n for n in q.graph.nodes if n.target is torch.ops.aten.embedding.default)
    head = [n for n in q.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    assert lookup.args[0] is head.args[1]  # one dequantized int8 table serves both readers
    table_bytes = 300 * 16 * 4
    assert _stored_bytes(ref) - _stored_bytes(q) > table_bytes // 2  # the fp32 table is gone, not kept beside
    assert not any(t.dtype == torch.float32 and t.shape == (300, 16) for t in q.gm.state_dict().values())
    assert_equivalent(ref, q, TOL, shapes=((None, None), (7, 3)))
    x = torch.randint(0, 300, (4, 6))
    with graphopt.load(graphopt.lower(q, "onnxruntime", tmp_path / "ort").path) as runner:
        torch.testing.assert_close(runner(x)[0], q(x)[0], atol=1e-5, rtol=1e-5)


def test_a_weight_another_op_reads_stays_fp32():
    class Reused(torch.nn.Module):  # the weight also enters arithmetic: quantizing would keep a second copy
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.head(x) + x @ self.head.weight.sum(0, keepdim=True).t()

    ref = graphopt.capture(Reused().eval(), (torch.randn(3, 16),))
    q, report = graphopt.optimize(ref, "quantize-int8-weights")
    assert any("its weight is also read by" in d and "stays fp32" in d for d in report.passes[0].declined)
    assert "quantized_decomposed.dequantize_per_channel.default" not in q.op_histogram()
    assert_equivalent(ref, q, 1e-6, shapes=((None, None),))
