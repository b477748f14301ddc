"""Incremental artifacts (graphopt.lower_incremental) on eager, ONNX Runtime and Inductor:
a 100-step replay of a batch of users with different history lengths against the
windowed full recompute (1e-4, fp32, every step), one-line refusals of bad state in
the same words on every runtime (and the runner keeps serving), the artifact's
layout and checksums. One incremental lowering per runtime, shared by the module.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from graphopt.runtimes.eager import EagerRunner
from graphopt.runtimes.inductor_code import wrapper_calls, wrapper_source

import graphopt
from graphopt.errors import ArtifactError, LoweringError, RunnerError
from graphopt.ir.program import Program
from graphopt.runtime import available_runtimes
from tests._incremental import WINDOW, derived, histories, optimized, replay, use_capture

RUNTIMES = ["eager", "onnxruntime", "inductor"]
#: Inductor's prefill holds a plain-weights package for 8+ rows per call (``split_rows``, on by default
#: for a base-size float32 prefill where MKL is not Intel's), so the replay's prefill (3 users x 5
#: events) runs it and test_prefill_split_rows below runs both
OPTIONS = {"inductor": {"split_rows": 8}}
#: the step entry lowered with its own options (here: single-threaded Inductor kernels), so the replay
#: below also covers an artifact whose two entries were compiled differently; split_rows reaches the
#: step too, whose float32 default is plain weights already: one package
STEP_OPTIONS = {"inductor": {"threads": 1}}
LENGTHS = [5, 3, 1]


@pytest.fixture(autouse=True, scope="module")
def _captured_once(program):
    use_capture(program("gpt-rec:tiny"))


@pytest.fixture(scope="module")
def reference():
    """A 100-step replay's new events and, per step, the eager prefill of the whole history
    under the window (the windowed full recompute; held to transformers in tests/passlib)."""
    rows = replay("native", LENGTHS, 100, two_at=50)
    prefill = derived().prefill
    steps = [(ids[:, before.shape[1]:], prefill(ids, mask)[0])
             for (_, before, _), (_, ids, mask) in zip(rows, rows[1:])]
    return rows[0][1], rows[0][2], steps


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    status = available_runtimes()
    out = {}
    for runtime in RUNTIMES:
        if status[runtime].available:
            out[runtime] = graphopt.lower_incremental(derived(), runtime, root / runtime,
                                                      step_options=STEP_OPTIONS.get(runtime),
                                                      **OPTIONS.get(runtime, {}))
    return out


@pytest.fixture(scope="module")
def runners(artifacts):
    opened = {name: graphopt.load(art.path) for name, art in artifacts.items()}
    yield opened
    for runner in opened.values():
        runner.close()


def _runner(runners, runtime):
    if runtime not in runners:
        pytest.skip(f"{runtime} is not available here: {available_runtimes()[runtime].reason}")
    return runners[runtime]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_replay_matches_windowed_recompute(runners, reference, runtime):
    """prefill + 100 steps (one of two events) of users with different history lengths on the
    runtime == the eager prefill of the whole history under the window, at every step."""
    runner = _runner(runners, runtime)
    ids, mask, steps = reference
    scores, state = runner.prefill(ids, mask)
    assert float((scores - derived().prefill(ids, mask)[0]).abs().max()) <= 1e-4
    worst = 0.0
    for new, want in steps:
        scores, state = runner.step(new, state)
        worst = max(worst, float((scores - want).abs().max()))
    assert len(steps) == 100 and worst <= 1e-4, worst
    assert state.length.tolist() == [n + 101 for n in LENGTHS]
    assert state.tensors["key_1"].shape == (3, 4, WINDOW, 8)


def _bad_states(state):
    t = state.tensors
    return {
        "window": ({**t, "key_0": t["key_0"][:, :, :3]},
                   "state 'key_0': expected shape [3, 4, 6, 8] (batch 3, max_history 6), got [3, 4, 3, 8]"),
        "dtype": ({**t, "value_1": t["value_1"].double()}, "state 'value_1': expected float32, got float64"),
        "missing": ({k: v for k, v in t.items() if k != "key_1"}, "state lacks 'key_1'"),
        "batch": ({**t, "key_0": t["key_0"][:2]}, "state 'key_0': expected shape [3, 4, 6, 8] (batch 3"),
        "negative": ({**t, "length": t["length"] - 100}, "state 'length': events seen must be >= 0"),
        "positions": ({**t, "length": t["length"] + 510}, "user 0 would reach position 515, past the 512 "
                                                           "positions this artifact serves"),
        "type": ([*t.values()], "state: expected an IncrementalState (or a dict of its tensors), got list"),
        # a state the runner did not return is scanned for NaN (its own is not, per step)
        "nan": ({**t, "value_0": torch.full_like(t["value_0"], float("nan"))}, "NaN at [0, 0, 0, 0]"),
    }


def _refusals(runner, runtime):
    """Each bad state's message (after ``runtime | ``); checks the runner keeps serving."""
    ids, mask = histories(LENGTHS)
    _, state = runner.prefill(ids, mask)
    new = torch.tensor([[7], [8], [9]])
    want, _ = runner.step(new, state)
    messages = {}
    for case, (bad, text) in _bad_states(state).items():
        with pytest.raises(RunnerError) as info:
            runner.step(new, bad)
        message = str(info.value)
        assert message.startswith(f"{runtime} | ") and "\n" not in message and text in message, (case, message)
        messages[case] = message.split(" | ", 1)[1]
    with pytest.raises(RunnerError, match=f"{runtime} \\| input 'input_ids': a step takes 1 to max_history \\(6\\)"):
        runner.step(torch.ones(3, 7, dtype=torch.long), state)
    with pytest.raises(RunnerError, match=f"{runtime} \\| input 'input_ids': values must be in \\[0, 51\\)"):
        runner.step(torch.tensor([[7], [8], [99]]), state)
    with pytest.raises(RunnerError, match="histories must be left-padded .* user 1 is not"):
        runner.prefill(ids, mask.flip(1))
    # the padding id (0, gpt-rec's) is no event: not as a new one, nor under attention_mask 1
    with pytest.raises(RunnerError, match=f"^{runtime} \\| input 'input_ids': user 1's new events hold the padding "
                                          "id 0, and a step's events are all real; step only the users with new "
                                          "events \\(state.select"):
        runner.step(torch.tensor([[7], [0], [9]]), state)
    real = ids.clone()
    real[1, -1] = 0
    with pytest.raises(RunnerError, match=f"^{runtime} \\| input 'input_ids': user 1 has the padding id 0 under "
                                          "attention_mask 1; give padding attention_mask 0"):
        runner.prefill(real, mask)
    # the runner's own state, edited in place, is checked in full again: the edits above, in place
    for case, edit in (("nan", lambda t: t["value_0"].fill_(float("nan"))),
                       ("negative", lambda t: t["length"].sub_(100)),
                       ("positions", lambda t: t["length"].add_(510))):
        _, own = runner.prefill(ids, mask)
        edit(own.tensors)
        with pytest.raises(RunnerError) as info:
            runner.step(new, own)
        assert str(info.value) == f"{runtime} | {messages[case]}", (case, str(info.value))
    again, _ = runner.step(new, state)  # still serving, and the refused calls changed nothing
    assert torch.equal(again, want)
    return messages


def test_bad_state_refused_in_the_same_words_and_runner_keeps_serving(runners):
    seen = {runtime: _refusals(runner, runtime) for runtime, runner in runners.items()}
    assert "eager" in seen and len(seen) >= 2, sorted(seen)
    first, *others = seen.values()
    for other in others:
        assert other == first


def test_own_state_is_read_only_and_tracked_to_the_last_position(runners):
    """The runner trusts the state it returned while unwritten (checks only its batch per step), so
    that state's mapping is read-only; it counts the events itself and refuses the step past the
    position table as it refuses a foreign state's (512 positions in gpt-rec:tiny)."""
    runner = runners["eager"]
    ids, mask = histories([509, 3])
    _, state = runner.prefill(ids, mask)
    with pytest.raises(TypeError):
        state.tensors["key_0"] = state.tensors["key_0"] * 0
    one = torch.tensor([[4], [5]])
    with pytest.raises(RunnerError, match="^eager \\| input 'input_ids': new events of 3 users for a state of 2; pass "
                                          "one row of new events per user of the state \\(state.select"):
        runner.step(torch.tensor([[4], [5], [6]]), state)  # the batch of an own state is still checked
    for _ in range(3):  # positions 509, 510, 511: the last ones the table has
        scores, state = runner.step(one, state)
    assert state.length.tolist() == [512, 6]
    foreign = {k: v.clone() for k, v in state.tensors.items()}
    for past in (state, foreign):  # own (tracked count) and foreign (scanned): one message
        with pytest.raises(RunnerError, match="user 0 would reach position 512, past the 512 positions"):
            runner.step(one, past)
    # the tracked count is the scanned one: one step before the end, both step and agree
    _, before = runner.prefill(ids, mask)
    _, before = runner.step(torch.tensor([[4, 4], [5, 5]]), before)
    got, _ = runner.step(one, before)
    want, _ = runner.step(one, {k: v.clone() for k, v in before.tensors.items()})
    assert torch.equal(got, want)


def test_state_select_and_cat(runners):
    """Users' states can be stored apart and batched again: rows step the same."""
    runner = runners["eager"]
    ids, mask = histories(LENGTHS)
    _, state = runner.prefill(ids, mask)
    new = torch.tensor([[4], [5], [6]])
    together, _ = runner.step(new, state)
    parts = [state.select(i) for i in range(3)]
    regrouped = graphopt.IncrementalState.cat([parts[2], parts[0], parts[1]])
    scores, _ = runner.step(new[[2, 0, 1]], regrouped)
    assert torch.allclose(scores, together[[2, 0, 1]], atol=1e-6)
    assert state.nbytes == 3 * derived().state_bytes()


def test_artifact_layout_and_checksums(artifacts, tmp_path):
    art = artifacts["eager"]
    shutil.copytree(art.path, tmp_path / "copy")
    manifest = json.loads((art.path / "manifest.json").read_text())
    inc = manifest["incremental"]
    assert inc["max_history"] == WINDOW and inc["state_dtype"] == "native" and inc["max_positions"] == 512
    assert inc["padding_id"] == 0  # a zoo model's (padding_id="auto")
    assert set(inc["entries"]) == {"prefill", "step"}
    assert manifest["backend"]["entry"] == "prefill/program.pt2"
    assert {"prefill/program.pt2", "step/program.pt2"} <= set(manifest["files"])
    assert [i["name"] for i in inc["entries"]["step"]["inputs"]][:2] == ["input_ids", "past_length"]
    # the lowered step is plain ATen: one SDPA per layer over cached + new keys (cat), no mask input
    step = Program.load(art.path / "step" / "program.pt2")
    ops = step.op_histogram()
    assert ops["aten.scaled_dot_product_attention.default"] == 2 and ops["aten.cat.default"] >= 4
    assert "attention_mask" not in step.input_names
    (tmp_path / "copy" / "step" / "program.pt2").write_bytes(b"not a program")
    with pytest.raises(ArtifactError, match=r"step/program\.pt2 is 13 bytes, the manifest says \d+ \(truncated or changed"):
        graphopt.load(tmp_path / "copy")


def test_step_entry_lowered_with_its_own_options(artifacts, tmp_path):
    if "inductor" not in artifacts:
        pytest.skip(f"inductor is not available here: {available_runtimes()['inductor'].reason}")
    entries = artifacts["inductor"].manifest["incremental"]["entries"]
    assert entries["step"]["options"]["threads"] == 1 and entries["prefill"]["options"]["threads"] == 0
    assert entries["step"]["backend"]["inductor_configs"]["cpp.threads"] == 1
    assert entries["prefill"]["backend"]["inductor_configs"]["cpp.threads"] == torch.get_num_threads()
    # Inductor's step default for a float32 step: plain weights and MKL's GEMM instead of oneDNN's
    # packed linear, although the prefill was compiled (packed) first in this very process
    assert entries["step"]["options"]["weight_prepack"] is False and entries["prefill"]["options"]["weight_prepack"]
    # neither entry autotunes by default (kernels picked at the probe's few rows lose at real histories)
    assert entries["prefill"]["options"]["max_autotune"] is False and entries["step"]["options"]["max_autotune"] is False
    root = artifacts["inductor"].path
    step = [c.kernel for c in wrapper_calls(wrapper_source(root / "step" / "model.pt2"))]
    prefill = [c.kernel for c in wrapper_calls(wrapper_source(root / "prefill" / "model.pt2"))]
    assert "aoti_torch_cpu__linear_pointwise" in prefill, prefill
    assert not [k for k in step if k.startswith("aoti_torch_cpu__linear_pointwise")], step
    assert "aoti_torch_cpu_addmm_out" in step, step
    # the prefill's plain-weights package for many rows, under the artifact's top folder; none for the
    # step, although split_rows reached it: its weights are plain already (weight_prepack off)
    assert entries["prefill"]["options"]["split_rows"] == entries["step"]["options"]["split_rows"] == 8
    manifest = artifacts["inductor"].manifest
    assert manifest["backend"]["split"]["entry"] == "prefill/model_rows.pt2" and "split" not in entries["step"]["backend"]
    assert "prefill/model_rows.pt2" in manifest["files"] and not (root / "step" / "model_rows.pt2").exists()
    rows = [c.kernel for c in wrapper_calls(wrapper_source(root / "prefill" / "model_rows.pt2"))]
    assert "aoti_torch_cpu_addmm_out" in rows and not [k for k in rows if "_linear_pointwise" in k], rows
    with pytest.raises(LoweringError, match=r"inductor \| lower step: unknown option 'fusion'"):
        graphopt.lower_incremental(derived(), "inductor", tmp_path / "bad", step_options={"fusion": "off"})
    assert not (tmp_path / "bad").exists()


def test_prefill_split_rows(runners):
    """The Inductor prefill's runner calls the packed package below ``split_rows`` rows per call
    (users x events) and the plain-weights one from there on (each call recorded on the way into the
    real package: on an Intel Xeon the two packages' outputs can be bit-identical, so the outputs alone
    cannot tell which ran): its outputs bit for bit the chosen package's (loaded alone), both within 1e-4
    of the eager prefill."""
    runner = _runner(runners, "inductor")
    import torch._inductor

    root = runner.artifact.path / "prefill"
    alone = {n: torch._inductor.aoti_load_package(str(root / n)) for n in ("model.pt2", "model_rows.pt2")}
    if not runner.is_active:
        runner.activate()
    packages, calls = runner._packages, []
    assert len(packages) == 2  # the packed entry, then the split's plain-weights package

    def recorded(index: int, model, boxed):
        if boxed is not None:
            return model, lambda flat: calls.append(index) or boxed(flat)
        return (lambda *args: calls.append(index) or model(*args)), None

    runner._packages = [recorded(i, *pair) for i, pair in enumerate(packages)]
    try:
        for lengths, package in (([3], "model.pt2"), ([7], "model.pt2"), ([4, 2], "model_rows.pt2"),
                                 (LENGTHS, "model_rows.pt2")):
            ids, mask = histories(lengths, seed=len(lengths))
            calls.clear()
            got = runner(ids, mask)
            assert calls == [0 if package == "model.pt2" else 1], (lengths, package, calls)
            want = derived().prefill(ids, mask)
            chosen = alone[package](ids, mask)
            assert all(torch.equal(g, c) for g, c in zip(got, chosen)), (lengths, package)
            assert max(float((g - w).abs().max()) for g, w in zip(got, want)) <= 1e-4
    finally:
        runner._packages = packages


def test_low_precision_steps_keep_packed_weights():
    """bf16 (and int8) steps keep oneDNN's packed kernels: only a float32 step is lowered unpacked;
    no step is autotuned unless asked (max_autotune's per-Program default is for full-sequence entries)."""
    if not available_runtimes()["inductor"].available:
        pytest.skip(f"inductor is not available here: {available_runtimes()['inductor'].reason}")
    from graphopt.passlib.incremental import derive_incremental
    from graphopt.runtime import get_runtime

    bf16, _ = graphopt.optimize(optimized(), "cast{dtype=bf16}", verify_each=False)
    backend = get_runtime("inductor")
    one = {"split_rows": 0}  # each entry one package (split_rows is for many rows per call)
    assert backend.prefill_defaults(derived().prefill) == {"max_autotune": False, **one}
    assert backend.step_defaults(derive_incremental(bf16, WINDOW).step) == {"max_autotune": False, **one}
    assert backend.step_defaults(derived().step) == {"max_autotune": False, "weight_prepack": False, **one}
    assert backend.step_defaults(derived("int8").step) == {"max_autotune": False, "weight_prepack": False,
                                                           **one}  # int8 state


def test_float32_step_and_prefill_defaults_follow_the_cpu_vendor(monkeypatch):
    """A float32 step of a base-size model: MKL on plain weights where MKL is Intel's tuned one,
    else Inductor's autotuned CPP GEMM template (MKL's generic path and oneDNN's one-row linear
    lose on an AMD EPYC: runtimes/inductor.py); small steps and other devices never autotune.
    Its prefill: one packed package where MKL is Intel's, else a plain-weights one beside it from
    SPLIT_ROWS rows per call; one package for a small, a bf16 or a CUDA prefill."""
    if not available_runtimes()["inductor"].available:
        pytest.skip(f"inductor is not available here: {available_runtimes()['inductor'].reason}")
    import graphopt.runtimes.inductor as inductor_runtime
    import graphopt.runtimes.inductor_autotune as autotune

    from graphopt import hardware
    from graphopt.passlib.incremental import derive_incremental

    backend = inductor_runtime.BACKEND
    plain = {"max_autotune": False, "weight_prepack": False, "split_rows": 0}
    template = {"max_autotune": True, "weight_prepack": True, "split_rows": 0}
    step = derived().step
    assert backend.step_defaults(step) == plain  # gpt-rec:tiny's step: below max_autotune's size bar
    monkeypatch.setattr(autotune, "MIN_GEMM_WEIGHTS", 1)  # as if base-size
    assert backend.step_defaults(step, {"device": "cpu"}) == (plain if hardware.has_fast_mkl() else template)
    prefill = derived().prefill
    bf16, _ = graphopt.optimize(optimized(), "cast{dtype=bf16}", verify_each=False)
    bf16_inc = derive_incremental(bf16, WINDOW)
    for fast, want, split in ((True, plain, 0), (False, template, inductor_runtime.SPLIT_ROWS)):
        monkeypatch.setattr(inductor_runtime, "has_fast_mkl", lambda fast=fast: fast)
        assert backend.step_defaults(step, {"device": "cpu"}) == want
        assert backend.step_defaults(step, {"device": "cuda"}) == plain  # CUDA: never a CPU template
        assert backend.prefill_defaults(prefill, {"device": "cpu"}) == {"max_autotune": False, "split_rows": split}
        assert backend.prefill_defaults(prefill, {"device": "cuda"})["split_rows"] == 0
        assert backend.prefill_defaults(bf16_inc.prefill, {"device": "cpu"})["split_rows"] == 0
    assert backend.step_defaults(bf16_inc.step, {"device": "cpu"}) == {"max_autotune": False, "split_rows": 0}
    monkeypatch.setattr(autotune, "MIN_GEMM_WEIGHTS", 10**9)  # gpt-rec:tiny as it is: one prefill package
    assert backend.prefill_defaults(prefill, {"device": "cpu"})["split_rows"] == 0


@pytest.mark.skipif(not available_runtimes()["onnxruntime"].available, reason="onnxruntime not installed")
def test_a_bf16_state_on_onnxruntime_says_what_to_use(tmp_path):
    """Was: "... computes in bfloat16 ...; drop the bf16 pass from the pipeline" for a plain O2 pipeline
    whose only bf16 is the state it was asked for."""
    with pytest.raises(LoweringError, match=r"^onnxruntime \| a bf16 state .* use int8 or native there, or the "
                                             r"inductor runtime$"):
        graphopt.lower_incremental(derived("bf16"), "onnxruntime", tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists()


def test_plain_runner_has_no_step():
    runner = EagerRunner.from_program(optimized())
    with pytest.raises(RunnerError, match="eager \\| this runner has no prefill/step entry points; lower the model "
                                          "with graphopt.lower_incremental"):
        runner.step(torch.ones(1, 1, dtype=torch.long), {})
