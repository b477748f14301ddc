"""Position tables bound the sequence length where torch.export proves nothing.

Was: a user's own module around GPT-2 (or a hand-written ``pos(arange(T))``)
was lowered with ``seq`` unbounded; a longer history read past the position
table: eager raised an IndexError, ONNX Runtime's Gather read out of range and
AOTInductor aborted the serving process (the Hugging Face audit of the
twenty-fifth session; Hugging Face folders were bounded by FolderModel only).
Now :func:`graphopt.runtime.position_bounds.position_bounds` bounds the label,
the contract carries it, and every runtime refuses a longer sequence in the
same words before its backend runs, while the longest allowed one scores as
eager does (fp32, atol 1e-5). Near misses must not get a bound they do not
have: positions wrapped with ``%``, sliced to their first row, an ``arange``
that only builds a mask, and an offset in a second dynamic size.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import RunnerError
from graphopt.runtime.contract import dim_ranges
from graphopt.runtime.position_bounds import position_bounds

ITEMS, ROWS, WIDTH = 50, 12, 16
DYNAMIC = {"ids": {0: "batch", 1: "seq"}}


class LearnedPositions(nn.Module):
    """A hand-written causal recommender: item + learned position embeddings, last position scored."""

    def __init__(self, rows: int = ROWS):
        super().__init__()
        self.item = nn.Embedding(ITEMS, WIDTH)
        self.pos = nn.Embedding(rows, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.arange(ids.shape[1]).unsqueeze(0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.item(ids) + self.pos(self.positions(ids))).cumsum(1)[:, -1]
        return h @ self.item.weight.T


class PaddedPositions(LearnedPositions):
    """RoBERTa's positions: ``cumsum(ids != pad) * (ids != pad) + pad`` (pad = 1, so rows - 2 fit)."""

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids.ne(1).int()
        return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + 1


class WrappedPositions(LearnedPositions):
    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        return (torch.arange(ids.shape[1]) % ROWS).unsqueeze(0)


class FirstRowOnly(LearnedPositions):
    """Positions sliced to their first row: the lookup reads row 0 at any length."""

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.arange(ids.shape[1])[:1].unsqueeze(0)


class MaskOnly(LearnedPositions):
    """arange builds a mask; the position table is read at a fixed row: nothing bounds seq."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (torch.arange(ids.shape[1]) < 100).float().unsqueeze(-1)
        h = (self.mix(self.item(ids) * keep + self.pos.weight[0])).cumsum(1)[:, -1]
        return h @ self.item.weight.T


class OffsetPositions(LearnedPositions):
    """Positions start after a second dynamic size (a past length): two symbols, no single bound."""

    def forward(self, ids: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(past.shape[1], past.shape[1] + ids.shape[1]).unsqueeze(0)
        h = self.mix(self.item(ids) + self.pos(pos)).cumsum(1)[:, -1]
        return h @ self.item.weight.T


def _capture(model: nn.Module, *extra: torch.Tensor, dynamic=DYNAMIC):
    torch.manual_seed(0)
    ids = torch.randint(2, ITEMS, (2, 6))
    return graphopt.capture(model.eval(), (ids, *extra), dynamic=dynamic)


@pytest.mark.parametrize("model,top", [(LearnedPositions(), ROWS), (PaddedPositions(), ROWS - 2)],
                         ids=["arange", "cumsum+pad"])
def test_position_tables_bound_seq_and_the_runtimes_refuse_past_it(tmp_path, model, top):
    program = _capture(model)
    assert position_bounds(program) == {"seq": top}
    assert dim_ranges(program)["seq"] == {"min": 1, "max": top}
    optimized, _ = graphopt.optimize(program, "O2")
    assert dim_ranges(optimized)["seq"]["max"] == top  # the bound survives the fp32 pipeline
    longest = torch.randint(2, ITEMS, (3, top))
    with torch.no_grad():
        expected = model(longest)
    too_long = torch.randint(2, ITEMS, (3, top + 1))
    with pytest.raises(IndexError):
        model(too_long)  # the model itself cannot score it
    runtimes = ("eager", "onnxruntime", "inductor") if top == ROWS else ("eager", "onnxruntime")  # one compile
    for runtime in runtimes:
        with graphopt.load(graphopt.lower(optimized, runtime, tmp_path / runtime).path) as runner:
            torch.testing.assert_close(runner(longest)[0], expected, atol=1e-5, rtol=1e-5)
            with pytest.raises(RunnerError) as info:
                runner(too_long)
            message = str(info.value)
            assert re.fullmatch(rf"{runtime} \| input 'ids': dim 1 \(seq\) must be .*{top}.*, got {top + 1}",
                                message), message
            torch.testing.assert_close(runner(longest)[0], expected, atol=1e-5, rtol=1e-5)  # still serving


def test_a_user_module_around_hugging_face_gpt2_is_bounded_by_its_position_table():
    from transformers import GPT2Config, GPT2Model

    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = GPT2Model(GPT2Config(vocab_size=ITEMS, n_positions=ROWS, n_embd=WIDTH, n_layer=1, n_head=2,
                                            bos_token_id=0, eos_token_id=0))

        def forward(self, ids):
            return self.gpt(input_ids=ids).last_hidden_state[:, -1] @ self.gpt.wte.weight.T

    program = _capture(Rec())
    assert dim_ranges(program)["seq"] == {"min": 1, "max": ROWS}


@pytest.mark.parametrize("model", [WrappedPositions(), FirstRowOnly(), MaskOnly()],
                         ids=["modulo", "first-row", "mask-only"])
def test_near_misses_get_no_bound(model):
    program = _capture(model)
    assert position_bounds(program) == {}
    assert dim_ranges(program)["seq"]["max"] is None
    with torch.no_grad():  # and they do score past the table's length, so a bound would be wrong
        model(torch.randint(2, ITEMS, (2, ROWS + 5)))


def test_two_symbols_give_no_bound():
    program = _capture(OffsetPositions(), torch.zeros(2, 3),
                       dynamic={"ids": {0: "batch", 1: "seq"}, "past": {0: "batch", 1: "past"}})
    assert position_bounds(program) == {}
