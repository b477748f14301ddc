"""The IncrementalState object on an eager incremental artifact (gpt-rec:tiny): pickled, deep-copied
and torch.save'd states step as the original and are checked in full; an own state edited in place
under torch.inference_mode() is refused; IncrementalState.cat/select refuse states of other layouts
with one line; the padding id recorded at lowering (padding_id=); a plain call of the artifact."""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle

import pytest
import torch

import graphopt
from graphopt import IncrementalState
from graphopt.errors import LoweringError, RunnerError
from graphopt.passlib.incremental import derive_incremental
from tests._incremental import WINDOW, derived, histories, optimized, use_capture

LENGTHS = [5, 3, 1]
NEW = torch.tensor([[7], [8], [9]])


@pytest.fixture(autouse=True, scope="module")
def _captured_once(program):
    use_capture(program("gpt-rec:tiny"))


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """Eager artifacts: native and int8 state of window WINDOW, native of window 8."""
    root = tmp_path_factory.mktemp("incremental_state")
    incs = {"native": derived(), "int8": derived("int8"), "w8": derive_incremental(optimized(), 8)}
    opened = {name: graphopt.load(graphopt.lower_incremental(inc, "eager", root / name).path)
              for name, inc in incs.items()}
    yield opened
    for runner in opened.values():
        runner.close()


def _state(runner, lengths=LENGTHS):
    return runner.prefill(*histories(lengths))[1]


def test_state_pickles_deep_copies_and_saves(eager):
    """Was: "cannot pickle 'mappingproxy' object" (and torch.save left a partial file). A copy steps
    as the original, and is checked in full (the runner trusts only its own, unwritten, state)."""
    runner = eager["native"]
    state = _state(runner)
    want, _ = runner.step(NEW, state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    copies = {"pickle": pickle.loads(pickle.dumps(state)), "deepcopy": copy.deepcopy(state),
              "torch.save": torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)}
    for how, restored in copies.items():
        assert isinstance(restored, IncrementalState) and restored.max_history == WINDOW, how
        assert restored.origin is None and restored.events is None and restored.versions is None, how
        got, _ = runner.step(NEW, restored)
        assert torch.equal(got, want), how
        restored.tensors["key_1"].fill_(float("nan"))  # a copy's own tensors: checked in full
        with pytest.raises(RunnerError, match="^eager \\| input 'past_key_1': NaN at \\[0, 0, 0, 0\\]"):
            runner.step(NEW, restored)
    got, _ = runner.step(NEW, state)  # the original was not touched by its copies' edits
    assert torch.equal(got, want)


def test_own_state_edited_under_inference_mode_is_refused(eager):
    """Under torch.inference_mode() the runner's state tensors are inference tensors, writable there and
    without version counters: an own state made there is checked in full (was: edits accepted unchecked)."""
    runner = eager["native"]
    with torch.inference_mode():
        for edit, text in ((lambda t: t["key_0"].fill_(float("nan")), "input 'past_key_0': NaN at [0, 0, 0, 0]"),
                           (lambda t: t["length"].add_(10**6), "user 0 would reach position 1000005, past the "
                                                               "512 positions")):
            state = _state(runner)
            edit(state.tensors)
            with pytest.raises(RunnerError) as info:
                runner.step(NEW, state)
            assert str(info.value).startswith("eager | ") and text in str(info.value), str(info.value)
        scores, state = runner.step(NEW, _state(runner))  # unedited: served
        assert bool(torch.isfinite(scores).all()) and state.length.tolist() == [n + 1 for n in LENGTHS]


def test_cat_refuses_states_of_other_layouts(eager):
    """Was: cat of a native and an int8 state gave float32 codes without scales, which the native step
    accepted (wrong scores); window 6 + 8: torch's raw error; cat([]): IndexError."""
    native, int8, w8 = (_state(eager[n]) for n in ("native", "int8", "w8"))
    cases = (
        ([native, int8], "IncrementalState.cat: state 1 'key_0' is int8 [4, 6, 8] per user on cpu, state 0's is "
                         "float32 [4, 6, 8] on cpu; batch only states of one artifact (the same max_history and "
                         "state_dtype)"),
        ([int8, native], "IncrementalState.cat: state 1 'key_0' is float32 [4, 6, 8] per user on cpu, state 0's "
                         "is int8 [4, 6, 8] on cpu; batch only states"),
        ([native, w8], "IncrementalState.cat: state 1 has max_history 8, state 0 has 6; batch only states"),
        ([native, IncrementalState({k: v for k, v in native.tensors.items() if k != "value_1"}, WINDOW)],
         "IncrementalState.cat: state 1 lacks 'value_1', which state 0 holds; batch only states"),
        ([], "IncrementalState.cat: no states given; pass a list of one or more states"),
        ([native, dict(native.tensors)], "IncrementalState.cat: item 1 is a dict, not an IncrementalState; "
                                         "pass the states prefill, step or select returned"),
    )
    for states, text in cases:
        with pytest.raises(RunnerError) as info:
            IncrementalState.cat(states)
        assert str(info.value).startswith(text) and "\n" not in str(info.value), str(info.value)
    both = IncrementalState.cat([native, native.select([1])])  # one layout: batched
    assert both.length.tolist() == [5, 3, 1, 3]
    with pytest.raises(RunnerError, match=r"^IncrementalState.select: index 5 does not pick users of this batch "
                                          r"of 3 \(.*\); pass user positions in \[0, 3\)$"):
        native.select(5)


def test_padding_id_is_recorded_at_lowering(eager, tmp_path):
    """padding_id="auto": a zoo Program's 0; a Program without the zoo's metadata (a model of one's own):
    none, and step keeps accepting id 0 as an event there; padding_id=N names it."""
    assert eager["native"].artifact.manifest["incremental"]["padding_id"] == 0
    own = derived()
    prefill = own.prefill.copy()
    prefill.meta.pop("zoo")
    own = dataclasses.replace(own, prefill=prefill)
    art = graphopt.lower_incremental(own, "eager", tmp_path / "own")
    assert art.manifest["incremental"]["padding_id"] is None
    with graphopt.load(art.path) as runner:
        _, state = runner.step(torch.tensor([[7], [0], [9]]), _state(runner))
        assert state.length.tolist() == [6, 4, 2]
    art = graphopt.lower_incremental(own, "eager", tmp_path / "named", padding_id=50)
    with graphopt.load(art.path) as runner, pytest.raises(RunnerError, match="user 2's new events hold the padding "
                                                                             "id 50"):
        runner.step(torch.tensor([[7], [0], [50]]), _state(runner))
    with pytest.raises(LoweringError, match="padding_id must be an integer id >= 0, None or 'auto', got 'zero'"):
        graphopt.lower_incremental(own, "eager", tmp_path / "bad", padding_id="zero")
    assert not (tmp_path / "bad").exists()


def test_plain_call_of_an_incremental_artifact_checks_histories_as_prefill(eager):
    """``runner(ids, mask)`` runs the prefill (README): it refuses what prefill refuses."""
    runner = eager["native"]
    ids, mask = histories(LENGTHS)
    for bad_ids, bad_mask in ((ids, mask.flip(1)), (torch.where(mask.bool(), ids, 0).index_fill(1, torch.tensor([4]), 0),
                                                    mask)):
        try:
            runner(bad_ids, bad_mask)
        except RunnerError:
            continue
        raise AssertionError("runner(ids, mask) accepted a history prefill refuses")
