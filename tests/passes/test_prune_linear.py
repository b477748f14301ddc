"""prune-linear: MLP towers through ReLU/BatchNorm (dlrm, two-tower, a hand-written MLP)."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import PassOptionError
from graphopt.ir.fx import fetch_attr
from graphopt.metrics import allclose_report
from graphopt.transform.analysis import count_flops
from tests.models import MLP


def _shape(program, target_prefix: str) -> tuple[int, ...]:
    for n in program.gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.linear.default,
                                                    torch.ops.aten._native_batch_norm_legit_no_training.default):
            stack = n.meta.get("nn_module_stack") or {}
            if stack and list(stack.values())[-1][0] == target_prefix:
                return tuple(fetch_attr(program.gm, n.args[1].target).shape)
    raise AssertionError(target_prefix)


def onnx_outputs(program, inputs):
    ort = pytest.importorskip("onnxruntime")
    onx = torch.onnx.export(program.export(), dynamo=True, verbose=False)
    sess = ort.InferenceSession(onx.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})]


def test_dlrm_hidden_layers_shrink_through_batchnorm(program):
    p = program("dlrm:tiny")  # bottom 13 -> 16 (BN, ReLU) -> 8 (ReLU); top 18 -> 16 (ReLU) -> 1
    x = p.sample_inputs(batch=5, seed=1)
    pruned, report = graphopt.optimize(p, "prune-linear{ratio=0.5}")
    assert _shape(pruned, "model.bottom.0") == (8, 13)
    assert _shape(pruned, "model.bottom.1") == (8,)  # BatchNorm weight; stats follow
    assert _shape(pruned, "model.bottom.3") == (8, 8)
    assert _shape(pruned, "model.top.0") == (8, 18)
    assert _shape(pruned, "model.top.2") == (1, 8)
    # bottom.0: rows+bias 8*13+8, BN 4*8, bottom.3 cols 8*8; top.0: 8*18+8, top.2 cols 8
    assert p.num_parameters() - pruned.num_parameters() == (112 + 32 + 64) + (152 + 8)
    assert count_flops(p, x) - count_flops(pruned, x) == 2 * 5 * (8 * 13 + 8 * 8 + 8 * 18 + 8)
    # bottom.3 feeds the interaction (stack): declined with the op that blocks it
    assert any("model.bottom.3" in d and "stack" in d for d in report.passes[0].declined)
    for batch in (1, 7):
        xb = p.sample_inputs(batch=batch, seed=2)
        assert pruned(*xb)[0].shape == p(*xb)[0].shape
    assert allclose_report(onnx_outputs(pruned, x), pruned(*x), 1e-4) is None


def test_two_tower_towers(program):
    p = program("two-tower:tiny")
    pruned, report = graphopt.optimize(p, "prune-linear{ratio=0.25}")
    assert [d["layer"] for d in report.passes[0].details] == ["model.user_tower.0", "model.item_tower.0"]
    assert _shape(pruned, "model.user_tower.2") == (16, 24)
    for batch in (2, 6):
        x = p.sample_inputs(batch=batch, seed=3)
        assert pruned(*x)[0].shape == p(*x)[0].shape


def test_hand_written_mlp_numerics_with_dead_units(zoo):
    """Units whose rows are zero contribute nothing: pruning exactly them is exact."""
    torch.manual_seed(0)
    model = MLP(8, 16, 4).eval()
    with torch.no_grad():
        model.fc1.weight[::2] = 0.0  # 8 dead units (ReLU(0 + b) * col is not 0: zero the bias too)
        model.fc1.bias[::2] = 0.0
    x = torch.randn(3, 8)
    pruned, report = graphopt.optimize(model, "remove-dropout,prune-linear{ratio=0.5}", example_inputs=(x,))
    assert report.passes[1].details[0]["removed"] == list(range(0, 16, 2))
    assert allclose_report(pruned(x), (model(x),), 1e-5) is None


def test_ratio_zero_exact_and_near_miss(program):
    p = program("dlrm:tiny")
    pruned, report = graphopt.optimize(p, "prune-linear{ratio=0}")
    assert report.passes[0].modified is False
    x = p.sample_inputs(batch=3, seed=4)
    assert allclose_report(pruned(*x), p(*x), 1e-5) is None
    # bert4rec: its only linear->act->linear chains are FFNs, left to prune-ffn
    _, report = graphopt.optimize(program("bert4rec:tiny"), "prune-linear{ratio=0.5}")
    assert report.passes[0].modified is False


def test_bad_option():
    with pytest.raises(PassOptionError, match=r"\[0, 1\)"):
        graphopt.parse_pipeline("prune-linear{ratio=1.5}")
