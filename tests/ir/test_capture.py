"""Capture: torch.export into a Program with dynamic dims and metadata."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt import CaptureError
from tests.models import MLP, DataDependent

SEQ_MODELS = ["bert4rec:tiny", "bert-cls:tiny", "gpt-rec:tiny"]


def _eager(zm, inputs):
    out = zm.module(**inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name", SEQ_MODELS)
def test_captured_at_4x16_runs_at_other_shapes(zoo, program, name):
    zm = zoo(name)
    prog = program(name)
    assert prog.inputs[0].shape == (4, 16)
    assert prog.inputs[0].dynamic == {0: "batch", 1: "seq"}
    for batch, seq in [(1, 64), (32, 128)]:
        inputs = zm.make_inputs(batch=batch, seq=seq, seed=3)
        out = prog(*inputs.values())[0]
        ref = _eager(zm, inputs)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dlrm:tiny", "two-tower:tiny"])
def test_ctr_models_dynamic_batch(zoo, program, name):
    zm = zoo(name)
    prog = program(name)
    for batch in (1, 32):
        inputs = zm.make_inputs(batch=batch, seed=5)
        torch.testing.assert_close(prog(*inputs.values())[0], zm.module(**inputs), atol=1e-5, rtol=1e-5)


def test_hf_model_output_is_flattened_and_named(program):
    prog = program("bert-cls:tiny")
    assert prog.output_names == ["logits"]
    assert prog.input_names == ["input_ids", "attention_mask"]
    assert [s.dtype for s in prog.inputs] == [torch.int64, torch.int64]


def test_ir_level_and_metadata_kept(program):
    prog = program("bert4rec:tiny")
    ops = prog.op_histogram()
    for op in ("linear", "scaled_dot_product_attention", "layer_norm", "gelu", "embedding"):
        assert ops[f"aten.{op}.default"] > 0, op
    for node in prog.graph.nodes:
        if node.op == "call_function" and node.users:
            assert "val" in node.meta, node.name
    linear = next(n for n in prog.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert "attention" in list(linear.meta["nn_module_stack"].values())[-1][0]


def test_plain_module_positional_inputs_and_train_mode_warning():
    torch.manual_seed(0)
    model = MLP().train()
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match="eval mode"):
        prog = graphopt.capture(model, (x,))
    assert model.training, "capture must restore the caller's mode"
    assert prog.input_names == ["x"]
    model.eval()
    torch.testing.assert_close(prog(torch.randn(7, 8, generator=torch.Generator().manual_seed(1)))[0],
                               model(torch.randn(7, 8, generator=torch.Generator().manual_seed(1))))


def test_static_capture_rejects_other_shapes():
    model = MLP().eval()
    prog = graphopt.capture(model, torch.randn(4, 8), dynamic=False)
    assert prog.inputs[0].dynamic == {}
    with pytest.raises(graphopt.RunnerError, match="dim 0 is static"):
        prog(torch.randn(5, 8))


def test_untraceable_model_gets_one_line_capture_error():
    with pytest.raises(CaptureError) as info:
        graphopt.capture(DataDependent(), (torch.randn(3),))
    msg = str(info.value)
    assert "\n" not in msg
    assert "DataDependent" in msg
    assert "torch.where" in msg or "torch.cond" in msg


def test_non_tensor_input_is_refused():
    with pytest.raises(CaptureError, match="tensor inputs only"):
        graphopt.capture(MLP(), (3,))
