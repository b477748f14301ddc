"""quantize-int8-dynamic: structure, numerics (tolerance 0.25, atol = rtol), save/load,
ONNX Runtime integer kernels via graphopt.qdq's translations, near-miss."""

from __future__ import annotations

import torch
from graphopt.passes.quantize_int8_dynamic import QuantizeInt8Dynamic

import graphopt
from graphopt.ir.program import Program
from tests.models import ActivationMatmul
from tests.passes._helpers import assert_equivalent
from tests.passes._precision import INTEGER_KERNELS, ort_optimized_ops

TOL = QuantizeInt8Dynamic.tolerance


def test_structure_numerics_and_round_trip(program, tmp_path):
    ref = program("bert4rec:tiny")
    q, report = graphopt.optimize(ref, "quantize-int8-dynamic")
    ops = q.op_histogram()
    assert ops["quantized_decomposed.choose_qparams.tensor"] == 9
    assert ops["quantized_decomposed.quantize_per_tensor.tensor"] == 9
    assert ops["quantized_decomposed.dequantize_per_channel.default"] == 13
    assert sum(t.dtype == torch.int8 for t in q.parameter_tensors().values()) == 13
    assert report.passes[0].stats == {"linear": 13, "activation-qdq": 9}
    assert_equivalent(ref, q, TOL, shapes=((16, None), (1, 8)))
    loaded = Program.load(q.save(tmp_path / "dyn.pt2"))
    x = q.sample_inputs(batch=2, seed=1)
    torch.testing.assert_close(loaded(*x), q(*x), atol=1e-6, rtol=1e-6)


def test_ort_runs_integer_kernels(program, tmp_path):
    q, _ = graphopt.optimize(program("dlrm:tiny"), "quantize-int8-dynamic")
    exported, optimized, sess = ort_optimized_ops(q, tmp_path)
    assert exported["DynamicQuantizeLinear"] == 4
    assert sum(optimized[k] for k in INTEGER_KERNELS) == 4, optimized
    x = q.sample_inputs(batch=6, seed=2)
    out = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), x)})[0]
    torch.testing.assert_close(torch.from_numpy(out), q(*x)[0], atol=1e-3, rtol=1e-3)


def test_near_miss_no_constant_weights():
    prog = graphopt.capture(ActivationMatmul(), (torch.randn(2, 3, 4), torch.randn(2, 5, 4)))
    _, report = graphopt.optimize(prog, "quantize-int8-dynamic")
    assert report.passes[0].modified is False
