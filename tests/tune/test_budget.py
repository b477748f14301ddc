"""The tuner's time budget predicts an autotuning Inductor compile as such when the runtime's
per-Program default turns autotuning on (a base-size model), not only when the candidate says so."""

from __future__ import annotations

import pytest

from graphopt.rec.zoo import load_model
from graphopt.tune.budget import AUTOTUNE_FACTOR, COMPILE_FACTOR, Budget, autotunes_for
from graphopt.tune.space import Candidate
from graphopt.tune.trials import Trial

pytest.importorskip("torch._inductor")


@pytest.fixture(scope="module")
def programs():
    return {size: load_model(f"bert4rec:{size}").capture() for size in ("tiny", "base")}


def _budget(program, reference_build: float = 2.0) -> Budget:
    budget = Budget(3600, clock=lambda: 0.0)
    budget.autotunes = autotunes_for(program)
    budget.observe(Trial(n=0, candidate=Candidate(runtime="eager"), stage="built", status="ok", compile_s=reference_build))
    return budget


def test_a_default_inductor_candidate_autotunes_on_a_base_model_only(programs):
    default = Candidate(runtime="inductor")
    off = Candidate(runtime="inductor", lower=(("max_autotune", "false"),))
    on = Candidate(runtime="inductor", lower=(("max_autotune", "true"),))
    base, tiny = autotunes_for(programs["base"]), autotunes_for(programs["tiny"])
    assert base(default) and not tiny(default)  # 3.6M vs 0.02M GEMM weight elements
    assert not base(off) and tiny(on)  # a given value wins
    assert not base(Candidate(runtime="onnxruntime")) and not base(Candidate(runtime="eager"))


def test_predicted_compile_of_a_default_base_candidate_counts_autotuning(programs):
    plain = 2.0 * COMPILE_FACTOR["inductor"]
    default = Candidate(runtime="inductor")
    assert _budget(programs["base"]).predict(default, screened=True) == pytest.approx(plain * AUTOTUNE_FACTOR)
    assert _budget(programs["tiny"]).predict(default, screened=True) == pytest.approx(plain)
    off = Candidate(runtime="inductor", lower=(("max_autotune", "false"),))
    assert _budget(programs["base"]).predict(off, screened=True) == pytest.approx(plain)


def test_an_autotuned_compile_seen_predicts_the_next_and_not_the_plain_ones(programs):
    budget = _budget(programs["base"])
    budget.observe(Trial(n=1, candidate=Candidate(runtime="inductor"), stage="built", status="ok", compile_s=70.0))
    assert budget.predict(Candidate(runtime="inductor", precision="cast{dtype=bf16}"), screened=True) == 70.0
    off = Candidate(runtime="inductor", lower=(("max_autotune", "false"),))
    assert budget.predict(off, screened=True) == pytest.approx(2.0 * COMPILE_FACTOR["inductor"])
