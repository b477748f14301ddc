"""Capture: torch.export into a Program with dynamic dims and metadata."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt import CaptureError
from tests.models import MLP, Counter, DataDependent

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


class _FlatBag(torch.nn.Module):
    """DLRM-style: flat item ids, one offset per user, dense features per user."""

    def __init__(self):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(300, 16, mode="sum")
        self.head = torch.nn.Linear(16, 8)

    def forward(self, ids, offsets, dense):
        return self.head(self.bag(ids, offsets)) + dense


def test_dynamic_true_labels_leading_dims_by_what_the_example_shows(tmp_path):
    """Was: dynamic=True labelled every leading dim "batch", so the contract held the flat ids' length
    equal to the number of users and every runner refused a real request ("dim 0 (batch) is 2 but 'ids'
    has batch 7"). The mask of a sequence model, which export keeps apart from the ids, stays "batch"."""
    torch.manual_seed(0)
    model = _FlatBag().eval()
    prog = graphopt.capture(model, (torch.tensor([5, 7, 9, 11, 13, 17]), torch.tensor([0, 2, 3, 5]), torch.randn(4, 8)))
    assert {s.name: s.dynamic for s in prog.inputs} == {
        "ids": {0: "ids_dim0"}, "offsets": {0: "batch"}, "dense": {0: "batch"}}
    x = (torch.arange(1, 8), torch.tensor([0, 3]), torch.randn(2, 8))  # 7 ids, 2 users
    with graphopt.load(graphopt.lower(prog, "eager", tmp_path / "bag").path) as runner:
        torch.testing.assert_close(runner(*x)[0], model(*x), atol=1e-6, rtol=1e-6)
        with pytest.raises(graphopt.RunnerError, match="'dense': dim 0 \\(batch\\) is 3 but 'offsets' has batch 2"):
            runner(x[0], x[1], torch.randn(3, 8))  # near miss: the two per-user inputs still must agree
    from graphopt.rec.zoo import load_model

    zm = load_model("bert4rec:tiny")
    seq = graphopt.capture(zm.module, zm.example_inputs)
    assert [s.dynamic for s in seq.inputs] == [{0: "batch", 1: "input_ids_dim1"}] * 2


def test_dynamic_spec_mistakes_are_one_line_capture_errors():
    """Were silent: a misspelt input name or a dim the input lacks left every dim static, and a batch-1
    example came out static (torch.export specializes sizes 0 and 1), refused later at serving time."""
    model = MLP().eval()
    x = torch.randn(3, 8)
    with pytest.raises(CaptureError, match=r"^dynamic names input 'inp', but the model's inputs are \['x'\]$"):
        graphopt.capture(model, (x,), dynamic={"inp": {0: "batch"}})
    with pytest.raises(CaptureError, match=r"^dynamic names dim 2 of input 'x', which has 2 dims \(0 to 1\)$"):
        graphopt.capture(model, (x,), dynamic={"x": {2: "batch"}})
    with pytest.raises(CaptureError, match=r"dim 0 \(batch\) has size 1 in the example, .* of size >= 2 there$"):
        graphopt.capture(model, (x[:1],), dynamic={"x": {0: "batch"}})
    prog = graphopt.capture(model, (x,), dynamic={"x": {0: "batch"}})  # near miss: the same, done right
    assert prog.inputs[0].dynamic == {0: "batch"}
    torch.testing.assert_close(prog(x[:1])[0], model(x[:1]), atol=1e-6, rtol=1e-6)


def test_one_id_per_bag_in_the_example_is_not_taken_for_the_batch(tmp_path):
    """Was: an example with one id per bag (single-valued features: as many ids as users) labelled the
    flat ids "batch", and every runner refused a request with more ids than users."""
    torch.manual_seed(0)
    model = _FlatBag().eval()
    prog = graphopt.capture(model, (torch.tensor([5, 7, 9, 11]), torch.arange(4), torch.randn(4, 8)))
    assert {s.name: s.dynamic for s in prog.inputs} == {
        "ids": {0: "ids_dim0"}, "offsets": {0: "batch"}, "dense": {0: "batch"}}
    x = (torch.arange(1, 8), torch.tensor([0, 3]), torch.randn(2, 8))  # 7 ids, 2 users
    with graphopt.load(graphopt.lower(prog, "onnxruntime", tmp_path / "bag").path) as runner:
        torch.testing.assert_close(runner(*x)[0], model(*x), atol=1e-5, rtol=1e-5)


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


class _Reassigning(torch.nn.Module):
    """A stateful model that replaces its buffer instead of updating it in place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x):
        self.count = self.count + 1
        return x * self.count


def test_stateful_model_is_captured_as_it_was_and_left_alone():
    x = torch.ones(2)
    model = Counter().eval()
    prog = graphopt.capture(model, (x,))
    assert model.count.item() == 0  # capture's own run of the model was put back
    assert [b.item() for b in prog.gm.buffers()] == [0.0]  # the Program starts where the model did
    assert torch.equal(prog(x)[0], torch.ones(2)) and torch.equal(prog(x)[0], torch.full((2,), 2.0))
    assert model.count.item() == 0  # running the Program advances its own state, not the model's
    assert torch.equal(model(x), torch.ones(2))


def test_a_reassigned_buffer_is_put_back_and_the_lost_update_named():
    x = torch.ones(2)
    model = _Reassigning().eval()
    with pytest.warns(UserWarning, match="reassigns buffer.*count.*in place"):
        prog = graphopt.capture(model, (x,))
    assert model.count.item() == 0 and torch.equal(model(x), torch.ones(2))
    assert torch.equal(prog(x)[0], torch.ones(2))  # as torch.export captured it: no state carried


class _NestedDict(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = self.lin(x)
        return {"scores": y, "extra": (y.sum(-1), y.amax(-1)), "more": {"z": y * 2}, "cache": None}


def test_values_nested_in_a_dict_are_outputs_too():
    """Was: only a dict's (or ModelOutput's) own tensors were kept, silently dropping 'extra' and 'more'
    (BertModel(output_hidden_states=True) lost its hidden_states); tuples already recursed."""
    torch.manual_seed(0)
    model = _NestedDict().eval()
    x = torch.randn(3, 8)
    prog = graphopt.capture(model, (x,))
    assert prog.output_names == ["scores", "extra.0", "extra.1", "more.z"]
    want = model(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)))
    got = prog(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)))
    for out, ref in zip(got, [want["scores"], *want["extra"], want["more"]["z"]]):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
