"""The tuner's per-layer sensitivity tables, measured for real on gpt-rec:tiny.

int8: the drop with one layer alone quantized; bf16: the drop of the default
``cast`` policy with one layer alone kept fp32. The keep-float ranking of each
family comes from its own table; a row is what the pipeline the tuner builds
from it gives (recomputed), and that pipeline keeps exactly that layer fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
from graphopt.passes.cast import TOLERANCE

import graphopt
from graphopt.bench.timing import TimingConfig
from graphopt.ir.fx import fetch_attr, module_path
from graphopt.tune.data import resolve_model, tune_data
from graphopt.tune.evaluate import Evaluator, _eager
from graphopt.tune.fidelity import Judge
from graphopt.tune.sensitivity import compute_sensitivity, ranking
from graphopt.tune.space import Candidate, o2_fusions
from tests.passes._helpers import assert_equivalent

QUICK = TimingConfig(warmup=1, rounds=2, round_time_s=0.0, max_calls=1)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tm = resolve_model("gpt-rec:tiny")
    td = tune_data(tm, batch=16)
    judge = Judge("topk-overlap", None, td, tm.reference())
    ev = Evaluator(tm, td, judge, [(16, 16)], "p50", QUICK, tmp_path_factory.mktemp("sens"))
    fusions = tuple(o2_fusions())
    return ev, fusions, compute_sensitivity(ev, fusions)


def _weight_dtypes(program) -> dict[str, torch.dtype]:
    """module path of each matrix op with a constant weight that runs on every position -> the weight's dtype
    (the rows prune-positions kept, the last layer's, are fp32 under cast's default policy anyway)."""
    out = {}
    for n in program.gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.linear.default, torch.ops.aten.addmm.default) \
                and not isinstance(n.meta["val"].shape[1], int):
            w = n.args[1] if n.target is torch.ops.aten.linear.default else n.args[2]
            if isinstance(w, torch.fx.Node) and w.op == "get_attr":
                out[module_path(n) or n.name] = fetch_attr(program.gm, w.target).dtype
    return out


def test_bf16_keep_float_ranking_comes_from_its_own_table(measured):
    ev, fusions, sens = measured
    labels = [r["layer"] for r in sens["int8"]]
    bf16 = {r["layer"]: r["drop"] for r in sens["bf16_layers"]}
    assert len(labels) == 8 and list(bf16) == labels  # one row per linear, the same names as int8's
    assert all(math.isfinite(d) for d in bf16.values())
    order = ranking(sens, "bf16")
    # kept first = smallest drop left, ties ordered by the (continuous) score error vs eager
    keys = {r["layer"]: (r["drop"], r["error"]) for r in sens["bf16_layers"]}
    assert all(math.isfinite(e) and e > 0 for _, e in keys.values())
    assert [keys[x] for x in order] == sorted(keys.values())
    int8 = {r["layer"]: (r["drop"], r["error"]) for r in sens["int8"]}
    assert [int8[x] for x in ranking(sens, "int8")] == sorted(int8.values(), reverse=True)
    # the error is what it says: keeping a layer fp32 leaves less error than casting every layer
    assert min(e for _, e in keys.values()) < ev.judge.score_error(_eager(graphopt.optimize(
        ev.program_for(Candidate(fusions=fusions), Candidate(fusions=fusions).pipeline), "cast{dtype=bf16}")[0]))
    assert ranking({"int8": sens["int8"]}, "bf16") == ranking(sens, "int8")  # an older table: int8's order


def test_a_bf16_row_is_what_the_keep_float_pipeline_gives(measured):
    ev, fusions, sens = measured
    order = ranking(sens, "bf16")
    base = Candidate(fusions=fusions)
    program = ev.program_for(base, base.pipeline)
    step = Candidate(fusions=fusions, precision="cast{dtype=bf16}", keep_float=1).resolved_pipeline(order)
    assert step.endswith(f"cast{{dtype=bf16 skip={order[0]}}}")
    kept, _ = graphopt.optimize(program, step.split(",")[-1])
    # structure: skip= keeps exactly that layer's weight fp32 (the first ranked one that runs on every
    # position: the last layer's position rows are fp32 under the default policy anyway)
    plain = _weight_dtypes(graphopt.optimize(program, "cast{dtype=bf16}")[0])
    assert len(plain) >= 5 and set(plain.values()) == {torch.bfloat16}
    layer = next(x for x in order if x in plain)
    one = _weight_dtypes(graphopt.optimize(program, f"cast{{dtype=bf16 skip={layer}}}")[0])
    assert one[layer] == torch.float32 and {d for k, d in one.items() if k != layer} == {torch.bfloat16}
    # the table's row is this pipeline's drop, recomputed
    assert ev.judge.sensitivity_drop(_eager(kept)) == pytest.approx(next(
        r["drop"] for r in sens["bf16_layers"] if r["layer"] == order[0]), abs=1e-9)
    # numerics: still eager's model within the bf16 tolerance, at two shapes
    assert_equivalent(program, kept, TOLERANCE["bf16"], shapes=((None, None), (1, 8)))
