"""Id ranges through constant shifts and float-to-integer casts (graphopt.runtime.index_ranges).

Was (capture audit, twenty-sixth session): ``emb(ids + 1)`` (row 0 kept for
padding) and CTR ids carried in a float tensor (``x.long()``) had no id range in
the contract; for an id of -2 (or -1.0) eager raised an IndexError, ONNX
Runtime's Gather wrapped it to the last row and scored silently, and Inductor
printed a C++ stack trace naming no input. Now the range follows the shift and
the cast, every runtime refuses in the same words before its backend runs, and
the ids at both ends of the range score as eager does (fp32, atol 1e-5). Near
miss: a float input whose other columns are dense features gets no range (a
negative feature is not an id).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import RunnerError
from graphopt.runtime.index_ranges import index_ranges

ROWS = 50


class Shifted(nn.Module):
    def __init__(self, shift: int = 1):
        super().__init__()
        self.shift = shift
        self.emb = nn.Embedding(ROWS, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, ids):
        return self.out(self.emb(ids + self.shift if self.shift >= 0 else ids - (-self.shift)).sum(1))


class FloatIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(ROWS, 8)

    def forward(self, x):
        return self.emb(x.long()).sum(1)


class FloatSlots(nn.Module):
    """Two id columns of one float tensor, each into its own table."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Embedding(10, 8), nn.Embedding(20, 8)

    def forward(self, x):
        return self.a(x[:, 0].long()) + self.b(x[:, 1].long())


class DenseBesideIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.dense = nn.Embedding(ROWS, 8), nn.Linear(3, 8)

    def forward(self, x):
        return self.emb(x[:, 0].long()) + self.dense(x[:, 1:])


def _capture(model, example):
    return graphopt.capture(model.eval(), (example,), dynamic={model.forward.__code__.co_varnames[1]: {0: "batch"}})


def _serve(tmp_path, program, runtime, model, good, bad, message):
    with graphopt.load(graphopt.lower(program, runtime, tmp_path / runtime).path) as runner:
        for x in good:
            with torch.no_grad():
                torch.testing.assert_close(runner(x)[0], model(x), atol=1e-5, rtol=1e-5)
        with pytest.raises(RunnerError) as info:
            runner(bad)
        assert re.fullmatch(rf"{runtime} \| input '\w+'" + message, str(info.value)), str(info.value)


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime", "inductor"])
def test_a_shifted_id_is_held_to_the_table_after_the_shift(tmp_path, runtime):
    torch.manual_seed(0)
    model = Shifted(1)
    program = _capture(model, torch.randint(0, ROWS - 1, (4, 3)))
    assert index_ranges(program) == {"ids": [-1, ROWS - 1]}
    ends = torch.tensor([[-1, 0, ROWS - 2], [ROWS - 2, -1, 3]])
    bad = torch.tensor([[0, -2, 1], [1, 2, 3]])
    with pytest.raises(IndexError):
        model(bad)  # the user's model refuses it too
    _serve(tmp_path, program, runtime, model, [ends], bad,
           re.escape(f": values must be in [-1, {ROWS - 1}), got -2 at [0, 1]"))


def test_a_subtracted_shift_moves_the_range_up():
    program = _capture(Shifted(-2), torch.randint(2, ROWS + 2, (4, 6)))
    assert index_ranges(program) == {"ids": [2, ROWS + 2]}


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime"])
def test_float_ids_cast_to_long_are_held_to_the_table(tmp_path, runtime):
    torch.manual_seed(0)
    model = FloatIds()
    program = _capture(model, torch.randint(0, ROWS, (4, 3)).float())
    assert index_ranges(program) == {"x": [0, ROWS]}
    ends = torch.tensor([[0.0, ROWS - 1.0, 3.0]])
    _serve(tmp_path, program, runtime, model, [ends], torch.tensor([[1.0, -1.0, 2.0]]),
           re.escape(f": values must be in [0, {ROWS}), got -1.0 at [0, 1]"))


def test_float_id_slots_get_one_range_each(tmp_path):
    model = FloatSlots()
    program = _capture(model, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert index_ranges(program) == {"x": {"dim": 1, "high": [10, 20]}}
    _serve(tmp_path, program, "onnxruntime", model, [torch.tensor([[9.0, 19.0], [0.0, 0.0]])],
           torch.tensor([[1.0, 2.0], [3.0, 20.0]]), re.escape("[:, 1, ...]: values must be in [0, 20), got 20.0 at [1, 1]"))


def test_dense_features_beside_an_id_column_get_no_range(tmp_path):
    torch.manual_seed(0)
    model = DenseBesideIds()
    program = _capture(model, torch.tensor([[3.0, 0.5, -2.0, 1.0], [4.0, -0.1, 0.3, 7.0]]))
    assert index_ranges(program) == {}
    x = torch.tensor([[5.0, -3.0, -4.0, -5.0]])  # negative dense values are features, not ids
    with graphopt.load(graphopt.lower(program, "onnxruntime", tmp_path / "ort").path) as runner:
        with torch.no_grad():
            torch.testing.assert_close(runner(x)[0], model(x), atol=1e-5, rtol=1e-5)


class SteppedSlots(nn.Module):
    """``ids[:, ::2][:, 1]`` is column 2, not column 1: a stepped slice renumbers the slots."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Embedding(n, 8) for n in (10, 5, 20, 20))

    def forward(self, ids):
        every_other = ids[:, ::2]
        return self.a(every_other[:, 0]) + self.b(every_other[:, 1]) + self.c(ids[:, 2]) + self.d(ids[:, 3])


def test_a_stepped_slice_does_not_number_slots_as_the_input(tmp_path):
    # was {"dim": 1, "high": [10, 5, 20, 20]}: column 2 (which feeds the 5-row table) allowed ids up to 19;
    # now the slots are unknown and every column is held to the smallest table
    torch.manual_seed(0)
    model = SteppedSlots()
    program = _capture(model, torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]]))
    assert index_ranges(program) == {"ids": [0, 5]}
    _serve(tmp_path, program, "onnxruntime", model, [torch.tensor([[4, 4, 4, 4], [0, 0, 0, 0]])],
           torch.tensor([[1, 0, 15, 4]]), re.escape(": values must be in [0, 5), got 15 at [0, 2]"))
