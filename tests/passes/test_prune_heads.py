"""prune-heads: structure, validity (two shapes, ONNX Runtime), numerics, near-miss, options."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import PassFailedError, PassOptionError, PreconditionError
from graphopt.ir.fx import fetch_attr
from graphopt.metrics import allclose_report, topk_overlap
from graphopt.transform.analysis import count_flops
from graphopt.transform.base import available_passes, get_pass

# bert4rec:tiny: hidden 32, 4 heads of 8, 2 layers
HIDDEN, HEADS, HEAD_DIM, LAYERS = 32, 4, 8, 2
Q_WEIGHT = "model.bert.encoder.layer.{}.attention.self.query.weight"


def _attr_shape(program, linear_module: str) -> tuple[int, ...]:
    for n in program.gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default:
            stack = n.meta.get("nn_module_stack") or {}
            if stack and list(stack.values())[-1][0] == linear_module:
                return tuple(fetch_attr(program.gm, n.args[1].target).shape)
    raise AssertionError(f"no linear from {linear_module}")


def onnx_outputs(program, inputs):
    """Export with torch.onnx (dynamo) and run in ONNX Runtime."""
    ort = pytest.importorskip("onnxruntime")
    onx = torch.onnx.export(program.export(), dynamo=True, verbose=False)
    sess = ort.InferenceSession(onx.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def test_removes_heads_and_shrinks_every_coupled_weight(program):
    p = program("bert4rec:tiny")
    x = p.sample_inputs(batch=2, seq=8, seed=1)
    pruned, report = graphopt.optimize(p, "prune-heads{ratio=0.5}")
    # structure: Q/K/V lose 2 heads of rows, the output projection the matching columns
    for layer in range(LAYERS):
        base = f"model.bert.encoder.layer.{layer}.attention"
        for proj in ("query", "key", "value"):
            assert _attr_shape(pruned, f"{base}.self.{proj}") == (2 * HEAD_DIM, HIDDEN)
        assert _attr_shape(pruned, f"{base}.output.dense") == (HIDDEN, 2 * HEAD_DIM)
    # the literal head count in view(sdpa, [b, 4, s, 8]) follows
    literal = [n.args[1][1] for n in pruned.gm.graph.nodes
               if n.target is torch.ops.aten.view.default and n.args[0].target is torch.ops.aten.scaled_dot_product_attention.default]
    assert literal == [2] * LAYERS
    # parameters and FLOPs drop by exactly the removed rows/columns
    removed = 2 * HEAD_DIM
    per_layer = 3 * (removed * HIDDEN + removed) + HIDDEN * removed
    assert p.num_parameters() - pruned.num_parameters() == LAYERS * per_layer
    tokens = 2 * 8
    linear_flops = 4 * 2 * tokens * HIDDEN * removed  # Q, K, V rows and output columns
    attention_flops = 2 * 2 * (2 * 2 * 8 * 8 * HEAD_DIM)  # QK^T and PV of 2 heads, batch 2, seq 8
    assert count_flops(p, x) - count_flops(pruned, x) == LAYERS * (linear_flops + attention_flops)
    # report: per layer what was removed
    rec = report.passes[0]
    assert [d["kept"] for d in rec.details] == [2, 2] and all(len(d["removed"]) == 2 for d in rec.details)
    assert sum(d["params_removed"] for d in rec.details) == LAYERS * per_layer
    assert "heads 4 -> 2" in report.render()


def test_still_runs_at_two_shapes_and_in_onnxruntime(program):
    p = program("bert4rec:tiny")
    pruned, _ = graphopt.optimize(p, "prune-heads{ratio=0.25}")
    pruned.gm.graph.lint()
    for batch, seq in ((1, 5), (3, 12)):
        x = p.sample_inputs(batch=batch, seq=seq, seed=2)
        out = pruned(*x)[0]
        assert out.shape == p(*x)[0].shape
        # numerics of an approximate pass: the ranking survives (tiny random BERT)
        assert topk_overlap(out, p(*x)[0], 10) >= 0.8
    x = p.sample_inputs(batch=3, seq=12, seed=3)
    assert allclose_report(onnx_outputs(pruned, x), pruned(*x), 1e-4) is None


def test_ratio_zero_is_exact_and_changes_nothing(program):
    p = program("bert4rec:tiny")
    pruned, report = graphopt.optimize(p, "prune-heads{ratio=0}")
    assert report.passes[0].modified is False
    x = p.sample_inputs(batch=2, seq=7, seed=4)
    assert allclose_report(pruned(*x), p(*x), 1e-5) is None


def test_near_miss_model_without_attention_does_not_fire(program):
    p = program("dlrm:tiny")
    _, report = graphopt.optimize(p, "prune-heads{ratio=0.5}")
    assert report.passes[0].modified is False


def test_taylor_and_global_scope(program):
    p = program("bert4rec:tiny")
    cal = [p.sample_inputs(batch=4, seq=16, seed=s) for s in range(2)]
    pruned, report = graphopt.optimize(p, "prune-heads{ratio=0.25 criterion=taylor scope=global}", calibration_data=cal)
    assert sum(len(d["removed"]) for d in report.passes[0].details) == 2  # floor(0.25 * 8)
    assert pruned.num_parameters() < p.num_parameters()
    with pytest.raises(PassFailedError) as err:
        graphopt.optimize(p, "prune-heads{criterion=taylor}")
    assert isinstance(err.value.__cause__, PreconditionError)


@pytest.mark.parametrize("text", ["prune-heads{ratio=1}", "prune-heads{ratio=-0.1}", "prune-heads{criterion=l3}",
                                  "prune-heads{scope=model}"])
def test_bad_options_fail_at_parse_time(program, text):
    p = program("bert4rec:tiny")
    with pytest.raises(PassOptionError):
        graphopt.optimize(p, text)


def test_global_ratio_that_empties_a_layer_raises_before_any_change(program):
    from graphopt.transform.analysis import propagate_shapes
    from graphopt.transform.manager import PassContext
    from graphopt.transform.shape_check import graph_digest

    p = program("bert4rec:tiny")
    propagate_shapes(p)
    before = graph_digest(p)
    # 7 of 8 heads ranked globally cannot leave one head in each of 2 layers
    with pytest.raises(PassOptionError, match="would remove all"):
        get_pass("prune-heads")(ratio=0.9, scope="global").run(p, PassContext(example_inputs=p.example_inputs))
    assert graph_digest(p) == before


@pytest.mark.skipif("fuse-qkv" not in available_passes(), reason="fuse-qkv pass is not registered yet")
@pytest.mark.parametrize("order", ["fuse-qkv,prune-heads{ratio=0.5},dce", "prune-heads{ratio=0.5},fuse-qkv,dce"])
def test_with_fused_qkv_before_or_after(program, order):
    p = program("bert4rec:tiny")
    plain, _ = graphopt.optimize(p, "prune-heads{ratio=0.5}")
    fused, report = graphopt.optimize(p, order)
    assert fused.op_histogram()["aten.split_with_sizes.default"] == LAYERS
    assert fused.num_parameters() == plain.num_parameters()
    for batch, seq in ((1, 5), (3, 12)):
        x = p.sample_inputs(batch=batch, seq=seq, seed=5)
        assert allclose_report(fused(*x), plain(*x), 1e-5) is None
