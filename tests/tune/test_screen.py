"""The tuner's early screen on the first users: it rejects a clearly broken variant there, and
never a variant that meets the bar on all users only because one user of the few moved."""

from __future__ import annotations

import torch

from graphopt.bench.accuracy import EvalData, evaluate
from graphopt.tune.data import TuneData
from graphopt.tune.evaluate import _eager
from graphopt.tune.fidelity import Judge


def _judge(program, max_drop: float):
    prog = program("bert4rec:tiny")
    base = _eager(prog)
    batches = [prog.sample_inputs(batch=8, seq=16, seed=s) for s in range(8)]  # 64 users; the first 8 screen
    with torch.no_grad():
        targets = torch.cat([base(*b)[0].argmax(-1) for b in batches])  # eager: HR@10 = NDCG@10 = 1
    full, first = EvalData(batches, targets), EvalData(batches[:1], targets[:8])
    data = TuneData(batches[:2], batches[2:4], evaluator=lambda fn: evaluate(fn, full, per_user=True),
                    subset_evaluator=lambda fn: evaluate(fn, first, per_user=True))
    return Judge("ndcg@10", max_drop, data, base), base, batches


def test_one_lost_user_on_the_first_users_is_judged_on_all_of_them(program):
    judge, base, batches = _judge(program, 0.02)  # bar 2%: one user of 64 is 1.6%, of the first 8 12.5%

    def loses_one_user(*xs):
        (out,) = base(*xs)
        out = out.clone()
        if xs[0] is batches[0][0]:  # the first user of all: its target (eager's top item) falls to the bottom
            out[0, out[0].argmax()] = out[0].min() - 1.0
        return (out,)

    first = judge.measure(loses_one_user, subset=True)
    assert first["change_pct"] < -8.0 and not first["meets"]  # more than 4x the bar on the first users
    r = judge.screen(loses_one_user)
    assert "subset" not in r and r["meets"], r["why"]  # on all 64 users it holds the bar
    assert r["users"]["lost"] == 1 and abs(r["change_pct"]) < 2.0


def test_a_broken_variant_is_still_rejected_on_the_first_users(program):
    judge, base, _ = _judge(program, 0.02)
    broken = lambda *xs: (-base(*xs)[0],)  # noqa: E731 - eager's top item becomes its last
    r = judge.screen(broken)
    assert r.get("subset") and not r["meets"] and "rejected before the full evaluation" in r["why"]
    assert r["users"]["lost"] == 8
