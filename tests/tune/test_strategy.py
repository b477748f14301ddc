"""Search strategies against a synthetic table of trials (no model, simulated clock).

The table is built so its structure is known: runtimes differ in speed and
compile cost, bf16 fails to build on onnxruntime, static int8 misses the bar
unless the two most sensitive layers stay float, and dropping fuse-qkv pays
on onnxruntime only. The strategies are replayed with
:class:`graphopt.tune.replay.ReplayContext`, the same harness the strategy
benchmark uses, under the real Budget rules.
"""

from __future__ import annotations

import pytest

from graphopt.tune.replay import ReplayContext, Table, replay
from graphopt.tune.space import Candidate, build_space
from graphopt.tune.strategy import STRATEGIES
from graphopt.tune.trials import BELOW_BAR, FAILED, OK

RUNTIMES = ["eager", "torchscript", "onnxruntime", "inductor"]
SPEED = {"eager": 1.0, "torchscript": 1.3, "onnxruntime": 1.6, "inductor": 2.0}
COMPILE = {"eager": 2.0, "torchscript": 1.0, "onnxruntime": 6.0, "inductor": 30.0}


def measure(cand: Candidate, pipeline: str) -> dict:
    rec = {"screen_s": 1.0, "compile_s": COMPILE[cand.runtime], "timing_s": 2.0,
           "fidelity": {"meets": True, "change_pct": 0.0}}
    family = cand.family
    if family == "bf16" and cand.runtime == "onnxruntime":
        return {**rec, "status": FAILED, "reason": "onnxruntime | no bf16 kernels", "objective": None, "timing_s": 0.0}
    if family == "int8" and cand.keep_float < 2:
        return {**rec, "status": BELOW_BAR, "reason": "eager: top-10 overlap 0.95 < 0.99", "objective": None,
                "compile_s": 0.0, "timing_s": 0.0, "fidelity": {"meets": False, "change_pct": -5.0}}
    factor = {"fp32": 1.0, "bf16": 1.5, "int8": 1.8 - 0.05 * cand.keep_float, "int8-dynamic": 1.2}[family]
    if cand.fusions is None:
        factor *= 0.9
    else:
        for f in ("fuse-qkv", "fuse-attention", "fuse-linear-act"):
            if f not in cand.fusions:
                factor *= 1.05 if (f == "fuse-qkv" and cand.runtime == "onnxruntime") else 0.97
    if cand.embeddings:
        factor *= 1.02
    return {**rec, "status": OK, "objective": SPEED[cand.runtime] * factor}


def screen(cand: Candidate, pipeline: str) -> dict:
    rec = measure(cand, pipeline)
    return {"meets": rec["status"] != BELOW_BAR, "eager_ms": 10.0 / (1.0 + 0.1 * len(pipeline)), "seconds": 1.0}


@pytest.fixture(scope="module")
def space():
    return build_space(RUNTIMES, bf16_kernels=True)  # the synthetic table has bf16 on every CPU


def run(space, strategy: str, seed: int, budget: float) -> ReplayContext:
    table = Table(ranking=["layer.3", "layer.0", "layer.2", "layer.1"], ranking_s=5.0)
    return replay(strategy, table, space, seed, budget, measure=measure, measure_screen=screen)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_same_seed_same_trial_order(space, strategy):
    a = [t.key for t in run(space, strategy, 0, 300).trials()]
    b = [t.key for t in run(space, strategy, 0, 300).trials()]
    assert a == b and len(a) > 10


@pytest.mark.parametrize("strategy", ["random", "halving"])
def test_another_seed_another_order(space, strategy):
    a = [t.key for t in run(space, strategy, 0, 300).trials()]
    b = [t.key for t in run(space, strategy, 1, 300).trials()]
    assert a != b


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_starts_with_the_reference_and_the_defaults(space, strategy):
    trials = run(space, strategy, 0, 300).trials()
    assert trials[0].candidate.fusions is None and trials[0].candidate.runtime == "eager"
    defaults = [t.pipeline for t in trials[1:17]]
    assert defaults[:4] == ["O2"] * 4 and set(defaults) == {"O2", "O2,cast{dtype=bf16}", "O2,quantize-int8",
                                                             "O2,quantize-int8{mixed=bf16}"}


def test_greedy_keeps_float_layers_when_int8_misses_the_bar_and_goes_on_after_a_failure(space):
    ctx = run(space, "greedy", 0, 400)
    trials = ctx.trials()
    failed = [t for t in trials if t.status == FAILED]
    assert failed and failed[0].candidate.runtime == "onnxruntime" and failed[0].candidate.family == "bf16"
    assert trials.index(failed[0]) < len(trials) - 1  # the search went on after it
    kept = [t for t in trials if t.candidate.keep_float]
    assert [t.candidate.keep_float for t in kept][:2] == [1, 2]  # fewest first, stops at the first that passes
    assert "skip=layer.3,layer.0" in kept[1].pipeline and kept[1].status == OK
    best = max((t for t in trials if t.ok), key=lambda t: t.objective)
    assert best.candidate.family == "int8" and best.candidate.runtime == "inductor"
    # fusions on/off per backend: every runtime with a result tried its best with the fusions off
    off = {t.candidate.runtime for t in trials if t.stage == "fusions" and t.candidate.fusions == ()}
    assert off == set(RUNTIMES)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("budget", [40.0, 120.0])
def test_budget_is_respected_and_expensive_trials_are_not_started(space, strategy, budget):
    ctx = run(space, strategy, 0, budget)
    longest = max(COMPILE.values()) + 3.0 + 5.0
    assert ctx.now <= max(budget * 1.1, budget + longest)
    # every trial but the first started only when its predicted cost fit: none ends past the budget
    ends = [end for end, _ in ctx.trajectory]
    assert all(end <= budget * 1.1 for end in ends[1:])
    if budget == 40.0:  # inductor (30 s) cannot fit after the cheap defaults
        assert sum(t.candidate.runtime == "inductor" for t in ctx.trials()) <= 1


def test_greedy_keeps_float_layers_when_bf16_misses_the_bar(space):
    """cast takes ``skip=`` too, so a bf16 family below the bar gets keep-float sets, ordered
    by the same sensitivity ranking, and the pipeline it builds is valid pipeline text."""
    from graphopt.transform.pipeline import parse_pipeline

    def measure_bf16(cand, pipeline):
        if cand.family == "bf16" and cand.keep_float < 1 and cand.runtime != "onnxruntime":
            return {"screen_s": 1.0, "compile_s": 0.0, "timing_s": 0.0, "status": BELOW_BAR, "objective": None,
                    "reason": "eager: HR@10 -0.64% < -0.5%", "fidelity": {"meets": False, "change_pct": -0.64}}
        return measure(cand, pipeline)

    def screen_bf16(cand, pipeline):
        rec = measure_bf16(cand, pipeline)
        return {"meets": rec["status"] != BELOW_BAR, "eager_ms": 10.0 / (1.0 + 0.1 * len(pipeline)), "seconds": 1.0}

    table = Table(ranking=["layer.3", "layer.0", "layer.2", "layer.1"], ranking_s=5.0)
    trials = replay("greedy", table, space, 0, 400, measure=measure_bf16, measure_screen=screen_bf16).trials()
    kept = [t for t in trials if t.candidate.keep_float and t.candidate.family == "bf16"]
    assert kept and kept[0].candidate.keep_float == 1 and kept[0].status == OK
    assert "cast{dtype=bf16 skip=layer.3}" in kept[0].pipeline
    parse_pipeline(kept[0].pipeline)  # cast's skip option takes the list
