"""prune-ffn: structure, validity (two shapes, ONNX Runtime), numerics, near-miss, options."""

from __future__ import annotations

import re

import pytest
import torch

import graphopt
from graphopt.errors import PassOptionError
from graphopt.ir.fx import fetch_attr, module_path
from graphopt.metrics import allclose_report, topk_overlap
from graphopt.transform.analysis import count_flops

HIDDEN, INTER, LAYERS = 32, 64, 2  # bert4rec:tiny


def _weights(program, pattern: str) -> list[tuple[int, ...]]:
    """Weight shapes of the linears whose module path matches ``pattern``."""
    return [tuple(fetch_attr(program.gm, n.args[1].target).shape) for n in program.gm.graph.nodes
            if n.target is torch.ops.aten.linear.default and re.fullmatch(pattern, module_path(n))]


def onnx_outputs(program, inputs):
    ort = pytest.importorskip("onnxruntime")
    onx = torch.onnx.export(program.export(), dynamo=True, verbose=False)
    sess = ort.InferenceSession(onx.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})]


def test_removes_intermediate_neurons_through_gelu(program):
    p = program("bert4rec:tiny")
    x = p.sample_inputs(batch=2, seq=8, seed=1)
    pruned, report = graphopt.optimize(p, "prune-ffn{ratio=0.5}")
    assert _weights(pruned, r".*\.intermediate\.dense") == [(INTER // 2, HIDDEN)] * LAYERS
    assert _weights(pruned, r".*layer\.\d\.output\.dense") == [(HIDDEN, INTER // 2)] * LAYERS  # FFN down projection
    assert _weights(pruned, r".*attention\.output\.dense") == [(HIDDEN, HIDDEN)] * LAYERS  # untouched
    assert pruned.op_histogram()["aten.gelu.default"] == p.op_histogram()["aten.gelu.default"]
    removed = INTER // 2
    assert p.num_parameters() - pruned.num_parameters() == LAYERS * (removed * HIDDEN + removed + HIDDEN * removed)
    tokens = 2 * 8
    assert count_flops(p, x) - count_flops(pruned, x) == LAYERS * 2 * (2 * tokens * HIDDEN * removed)
    details = report.passes[0].details
    assert [(d["kind"], d["of"], d["kept"]) for d in details] == [("ffn", INTER, INTER // 2)] * LAYERS
    # the transform head (linear -> gelu -> layer_norm) is not an FFN group
    assert not any("transform" in d["layer"] for d in details)


def test_runs_at_two_shapes_onnx_and_keeps_the_ranking(program):
    p = program("bert4rec:tiny")
    pruned, _ = graphopt.optimize(p, "prune-ffn{ratio=0.3 criterion=l2}")
    for batch, seq in ((1, 4), (3, 11)):
        x = p.sample_inputs(batch=batch, seq=seq, seed=7)
        assert topk_overlap(pruned(*x)[0], p(*x)[0], 10) >= 0.8
    x = p.sample_inputs(batch=3, seq=11, seed=8)
    assert allclose_report(onnx_outputs(pruned, x), pruned(*x), 1e-4) is None


def test_ratio_zero_is_exact(program):
    p = program("bert4rec:tiny")
    pruned, report = graphopt.optimize(p, "prune-ffn{ratio=0}")
    assert report.passes[0].modified is False
    x = p.sample_inputs(batch=2, seq=6, seed=2)
    assert allclose_report(pruned(*x), p(*x), 1e-5) is None


def test_near_miss_mlp_without_residual_is_not_an_ffn(program):
    _, report = graphopt.optimize(program("dlrm:tiny"), "prune-ffn{ratio=0.5}")
    assert report.passes[0].modified is False


def test_taylor_uses_calibration_batches(program):
    p = program("bert4rec:tiny")
    cal = [p.sample_inputs(batch=4, seq=16, seed=s) for s in range(2)]
    l1, l1_report = graphopt.optimize(p, "prune-ffn{ratio=0.5}")
    taylor, report = graphopt.optimize(p, "prune-ffn{ratio=0.5 criterion=taylor}", calibration_data=cal)
    assert taylor.num_parameters() == l1.num_parameters()
    # gradients, not weight norms, chose these neurons
    assert [d["removed"] for d in report.passes[0].details] != [d["removed"] for d in l1_report.passes[0].details]


@pytest.mark.parametrize("text", ["prune-ffn{ratio=1.0}", "prune-ffn{ratio=2}", "prune-ffn{criterion=random}"])
def test_bad_options(program, text):
    with pytest.raises(PassOptionError):
        graphopt.optimize(program("bert4rec:tiny"), text)
