"""Capture audit: example layout, train-mode children, input writes, keyword order, coincident sizes,
size-1 examples and the messages for what capture does not take. Every runtime is checked against
the user's eager model (fp32: 1e-5)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graphopt
from graphopt import CaptureError
from graphopt.errors import RunnerError

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _runner(prog, runtime, path):
    return graphopt.load(graphopt.lower(prog, runtime, path).path)


class _TwoIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x, w):
        return self.l2(torch.relu(self.l1(x))) * w


def test_strided_example_is_captured_contiguous_for_every_runtime(tmp_path):
    """Was: a transposed example made the Inductor artifact compute wrong scores (off by 0.64), at the
    example and at a new batch: export recorded the example's strides, AOTInductor compiled for them."""
    torch.manual_seed(0)
    model = _TwoIn().eval()
    example = (torch.randn(16, 4).t(), torch.randn(1, 4).expand(4, 4))
    prog = graphopt.capture(model, example)
    assert all(t.is_contiguous() for t in prog.example_inputs)
    batch8 = (torch.randn(8, 16), torch.randn(8, 4))
    for runtime in ("inductor", "onnxruntime"):
        with _runner(prog, runtime, tmp_path / runtime) as runner:
            for inputs in (example, batch8):
                torch.testing.assert_close(runner(*inputs)[0], model(*inputs), **TOL)


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.do, self.l2 = nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 4)

    def forward(self, x):
        return self.l2(self.do(torch.relu(self.bn(self.l1(x)))))


def _trained_head():
    torch.manual_seed(0)
    model = _Head()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 16) * 3 + 2)  # running stats away from (0, 1)
    return model


def test_children_left_in_train_mode_are_captured_in_eval_mode(tmp_path):
    """Was: only model.training was looked at: a Dropout and a BatchNorm left training under an eval
    parent were captured in train mode (eager and TorchScript random, ORT in eval), with no warning."""
    model = _trained_head().eval()
    model.do.train()
    model.bn.train()
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match=r"modules in train mode \(bn, do\);.*eval mode.*call model.eval\(\)"):
        prog = graphopt.capture(model, (x,))
    assert [m.training for m in (model, model.bn, model.do)] == [False, True, True]  # left as they were
    reference = _trained_head().eval()
    reference.load_state_dict(model.state_dict())
    for runtime in ("eager", "torchscript", "onnxruntime"):
        with _runner(prog, runtime, tmp_path / runtime) as runner:
            torch.testing.assert_close(runner(x)[0], reference(x), **TOL)
            torch.testing.assert_close(runner(x[:2])[0], reference(x[:2]), **TOL)  # no batch statistics


def test_each_modules_own_training_flag_is_restored():
    """Was: ``model.train()`` after capture put a frozen BatchNorm (eval under a training parent) in
    train mode, and the user's next training step moved its running statistics."""
    model = _trained_head().train()
    model.bn.eval()  # fine-tuning with frozen BatchNorm statistics
    with pytest.warns(UserWarning, match="train mode"):
        graphopt.capture(model, (torch.randn(8, 16),))
    assert {n: m.training for n, m in model.named_modules()} == {"": True, "l1": True, "bn": False, "do": True,
                                                                  "l2": True}


class _WritesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


def test_a_forward_writing_into_its_input_leaves_the_callers_tensor_alone(tmp_path):
    """Was: eager, TorchScript and Inductor doubled the caller's tensor on every call, ONNX Runtime did
    not; and capture's own run of the model doubled the example."""
    torch.manual_seed(0)
    model = _WritesInput().eval()
    example = torch.randn(4, 8)
    kept = example.clone()
    with pytest.warns(UserWarning, match=r"modifies input\(s\) 'x' in place; .* as if on a copy"):
        prog = graphopt.capture(model, (example,))
    assert torch.equal(example, kept)
    x = torch.randn(5, 8)
    want = model(x.clone())
    for runtime in ("eager", "torchscript", "onnxruntime"):
        with _runner(prog, runtime, tmp_path / runtime) as runner:
            given = x.clone()
            torch.testing.assert_close(runner(given)[0], want, **TOL)
            assert torch.equal(given, x), runtime


class _IdsMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(50, 16), nn.Linear(16, 4)

    def forward(self, ids, mask):
        return self.lin((self.emb(ids) * mask.unsqueeze(-1)).sum(1))


def test_a_keyword_example_in_another_order_follows_forwards_signature():
    """Was: capture(m, {"mask": ..., "ids": ...}) made the Program's order (mask, ids), so a positional
    call in the model's own order fed the mask as ids: silently wrong scores."""
    torch.manual_seed(0)
    model = _IdsMask().eval()
    prog = graphopt.capture(model, {"mask": torch.randint(0, 2, (4, 6)), "ids": torch.randint(0, 50, (4, 6))})
    assert prog.input_names == ["ids", "mask"]
    ids, mask = torch.randint(0, 50, (8, 9)), torch.randint(0, 2, (8, 9))
    torch.testing.assert_close(prog(ids, mask)[0], model(ids, mask), **TOL)
    torch.testing.assert_close(prog(mask=mask, ids=ids)[0], model(ids, mask), **TOL)


class _UsersItems(nn.Module):
    def __init__(self):
        super().__init__()
        self.users, self.items = nn.Embedding(100, 16), nn.Embedding(200, 16)

    def forward(self, users, items):
        return self.users(users) @ self.items(items).T  # (B, C) scores


def test_unrelated_dims_equal_in_the_example_get_their_own_labels(tmp_path):
    """Was: users (B,) and items (C,) at 4 and 4 in the example were both labelled "batch", and every
    runner refused B=2, C=50, which the artifact computes right."""
    torch.manual_seed(0)
    model = _UsersItems().eval()
    prog = graphopt.capture(model, (torch.randint(0, 100, (4,)), torch.randint(0, 200, (4,))))
    assert [s.dynamic for s in prog.inputs] == [{0: "batch"}, {0: "items_dim0"}]
    users, items = torch.randint(0, 100, (2,)), torch.randint(0, 200, (50,))
    with _runner(prog, "onnxruntime", tmp_path / "ort") as runner:
        torch.testing.assert_close(runner(users, items)[0], model(users, items), **TOL)


def test_a_size_one_example_under_dynamic_true_says_to_capture_at_size_two(tmp_path):
    """Was: silent; batch 8 was refused later with "capture with that dim dynamic", as it already was."""
    model = _IdsMask().eval()
    with pytest.warns(UserWarning, match=r"input 'ids' dim 0 \(size 1\), 'mask' dim 0 \(size 1\) stays fixed: .* "
                                         r"capture with an example of size >= 2 there$"):
        prog = graphopt.capture(model, (torch.randint(0, 50, (1, 6)), torch.ones(1, 6, dtype=torch.long)))
    assert prog.inputs[0].dynamic == {1: "ids_dim1"}
    with graphopt.load(graphopt.lower(prog, "eager", tmp_path / "eager").path) as runner:  # and serving says why
        with pytest.raises(RunnerError, match=r"^eager \| input 'ids': dim 0 is static \(1\), got 8; the example had "
                                              r"that size, .* capture with an example of size >= 2 in that dim"):
            runner(torch.randint(0, 50, (8, 6)), torch.ones(8, 6, dtype=torch.long))
    with warnings.catch_warnings():  # near miss: batch 2 varies, and nothing is said
        warnings.simplefilter("error", UserWarning)
        prog = graphopt.capture(model, (torch.randint(0, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long)))
    ids, mask = torch.randint(0, 50, (7, 3)), torch.ones(7, 3, dtype=torch.long)
    torch.testing.assert_close(prog(ids, mask)[0], model(ids, mask), **TOL)


class _Flag(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x, normalize: bool = False, extra=None):
        return self.lin(x), None


def test_what_capture_does_not_take_is_named_in_one_line_with_the_next_step(tmp_path):
    x = torch.randn(4, 8)
    mlp = nn.Sequential(nn.Linear(8, 4)).eval()
    cases = [
        (lambda: graphopt.capture(torch.jit.script(mlp), (x,)),
         r"^capture takes the original nn.Module, not a TorchScript module; pass the model before torch.jit"),
        (lambda: graphopt.capture(_Flag().eval(), (x,)),
         r"^model output 1 \(of the tuple it returns\) is None; graphopt serves tensor outputs: drop it .* dict"),
        (lambda: graphopt.capture(_Flag().eval(), (x, True)),
         r"^input 'normalize' is bool; graphopt captures tensor inputs only: .*wrapper nn.Module"),
        (lambda: graphopt.capture(_Flag().eval(), (x, x, (x, x))),
         r"^input 'extra' is tuple; graphopt captures tensor inputs only: pass each tensor in it as an input"),
        (lambda: graphopt.capture(_Flag().eval(), (x, x, None)),
         r"^input 'extra' is NoneType; .* without 'extra', so forward's default applies$"),
    ]
    for call, message in cases:
        with pytest.raises(CaptureError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    from graphopt.errors import ModelNotFoundError
    from graphopt.rec.resolve import load_program

    source = tmp_path / "mymodel.py"
    source.write_text("import torch\n")
    with pytest.raises(ModelNotFoundError, match=r"mymodel.py is a Python file, not a MODEL; capture .*graphopt"
                                                 r".capture\(.*program.save\(\"m.pt2\"\)\) and pass m.pt2$"):
        load_program(str(source))


def test_max_norm_renormalisation_leaves_the_users_weights_alone():
    """Was: capture's own run renormalised the user's EmbeddingBag rows in place (max_norm; up to 1.15
    changed), and running the Program, which shared the weight, changed them again. The Program now
    owns a copy of a weight its graph writes; its scores equal the user's model's (1e-5)."""
    torch.manual_seed(0)
    model = nn.EmbeddingBag(20, 4, max_norm=1.0, mode="sum").eval()
    before = model.weight.detach().clone()
    ids = torch.randint(0, 20, (3, 5))
    prog = graphopt.capture(model, (ids,))
    torch.testing.assert_close(model.weight.detach(), before, atol=0, rtol=0)
    got = prog(ids)[0]
    torch.testing.assert_close(model.weight.detach(), before, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids), **TOL)


@pytest.mark.parametrize("wrap", ["DataParallel", "compile", "DataParallel+compile"])
def test_a_wrapped_model_is_captured_as_the_model_inside(wrap, tmp_path):
    """Was: DataParallel's ``forward(*inputs)`` named the inputs ``input_0``/``input_1`` (the
    contract, the id ranges and every runtime's messages said so); the model inside is captured."""
    torch.manual_seed(0)
    model = _TwoIn().eval()
    wrapped = torch.compile(model) if "compile" in wrap else model
    wrapped = nn.DataParallel(wrapped) if wrap.startswith("DataParallel") else wrapped
    example = (torch.randn(4, 16), torch.randn(4, 4))
    prog = graphopt.capture(wrapped, example)
    assert [spec.name for spec in prog.inputs] == ["x", "w"]
    with _runner(prog, "onnxruntime", tmp_path / "ort") as runner, torch.no_grad():
        torch.testing.assert_close(runner(*example)[0], model(*example), **TOL)


class _ReturnsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return self.l(x), x


@pytest.mark.parametrize("runtime", ["eager", "torchscript", "onnxruntime", "inductor"])
def test_an_output_that_is_an_input_comes_back_as_a_copy_on_every_runtime(runtime, tmp_path):
    """Was: eager, TorchScript and Inductor returned the caller's own tensor (writing into the
    outputs changed the request), ONNX Runtime a copy."""
    torch.manual_seed(0)
    model = _ReturnsInput().eval()
    prog = graphopt.capture(model, torch.randn(2, 4))
    x = torch.randn(3, 4)
    with _runner(prog, runtime, tmp_path / runtime) as runner, torch.no_grad():
        scores, echoed = runner(x)
        torch.testing.assert_close(scores, model(x)[0], **TOL)
        torch.testing.assert_close(echoed, x, atol=0, rtol=0)
        assert echoed.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
