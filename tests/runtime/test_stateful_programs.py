"""A Program that updates a buffer in place is served only where the state persists.

Was (capture audit, twenty-sixth session): a forward doing ``self.n.add_(1)``
lowered everywhere; eager and TorchScript advanced the state from call to call
as the user's model does (4, 5, 6 times the output), ONNX Runtime and Inductor
served every call from the captured value (4, 4, 4), with no word. Now the
runtimes without state refuse it at lowering in one line, before any export or
compile, and eager and TorchScript match the user's model call after call
(fp32, atol 1e-5).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import LoweringError
from graphopt.runtime.backend import mutated_buffers


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("n", torch.tensor(3.0))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.n.add_(1)
        return self.lin(x) * self.n


def _program():
    torch.manual_seed(0)
    model = Counter().eval()
    reference = copy.deepcopy(model)  # capture leaves the user's state as it was: compare with a twin
    return graphopt.capture(model, (torch.randn(2, 4),)), reference


def test_the_updated_buffer_is_found():
    program, _ = _program()
    assert mutated_buffers(program) == ["model.n"]
    plain = graphopt.capture(nn.Linear(4, 4).eval(), (torch.randn(2, 4),))
    assert mutated_buffers(plain) == []
    renorm = nn.EmbeddingBag(20, 4, max_norm=1.0, mode="sum").eval()  # renormalises its rows in place
    assert mutated_buffers(graphopt.capture(renorm, (torch.randint(0, 20, (3, 5)),))) == ["model.weight"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "inductor", "stages"])
def test_runtimes_without_state_refuse_it_in_one_line(tmp_path, runtime):
    program, _ = _program()
    with pytest.raises(LoweringError) as info:
        graphopt.lower(program, runtime, tmp_path / runtime, **({"stages": 1} if runtime == "stages" else {}))
    message = str(info.value)
    assert re.fullmatch(rf"{runtime} \| Counter updates n in place on every call \(model state: a counter, running "
                        rf"statistics, max_norm's renormalised weights\); {runtime} artifacts "
                        r"keep no state between calls and would score each call from the captured value: lower it "
                        r"for eager or torchscript, or pass the state in as an input and return its update",
                        message), message
    assert not (tmp_path / runtime).exists()


@pytest.mark.parametrize("runtime", ["eager", "torchscript"])
def test_runtimes_with_state_follow_the_users_model(tmp_path, runtime):
    program, reference = _program()
    x = torch.randn(3, 4)
    with graphopt.load(graphopt.lower(program, runtime, tmp_path / runtime).path) as runner:
        for _ in range(3):
            with torch.no_grad():
                torch.testing.assert_close(runner(x)[0], reference(x), atol=1e-5, rtol=1e-5)
