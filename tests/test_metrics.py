"""graphopt.metrics: one definition of each metric, and the fidelity bar."""

from __future__ import annotations

import math

import pytest
import torch

from graphopt.metrics import (
    FIDELITY_BAR,
    agreement,
    ndcg_vs_reference,
    ranking_drift,
    relative_change,
    score_rows,
)


def test_ndcg_vs_reference_identical_reversed_and_disjoint():
    ref = torch.arange(20.0)[None]
    assert ndcg_vs_reference(ref, ref, 10) == pytest.approx(1.0)
    assert ndcg_vs_reference(-ref, ref, 10) == pytest.approx(0.0)  # none of the top 10
    swapped = ref.clone()
    swapped[0, [19, 10]] = swapped[0, [10, 19]]  # best item falls to rank 10, still in the top 10 set
    assert 0.0 < ndcg_vs_reference(swapped, ref, 10) < 1.0


def test_int8_guard_and_bench_use_the_same_ndcg():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(8, 50, generator=g)
    out = ref + 0.3 * torch.randn(8, 50, generator=g)
    guard = agreement("ndcg", [out], [ref], 10)
    bench = ranking_drift([out], [ref], 10)["ndcg_vs_eager"]
    assert guard == pytest.approx(bench, abs=1e-12)
    assert guard < 1.0


def test_score_rows_ranks_the_batch_for_one_score_per_row():
    assert score_rows(torch.randn(32, 1)).shape == (1, 32)
    assert score_rows(torch.randn(32)).shape == (1, 32)
    assert score_rows(torch.randn(4, 7, 50)).shape == (28, 50)


def test_relative_change_sign_means_worse_for_logloss():
    assert relative_change(0.99, 1.0, "ndcg@10") == pytest.approx(-1.0)
    assert relative_change(1.01, 1.0, "logloss") == pytest.approx(-1.0)
    assert relative_change(0.0, 0.0) == 0.0
    assert math.isnan(relative_change(1.0, 0.0))


def test_fidelity_bar_with_and_without_eval_data():
    eager = {"ndcg@10": 0.0500, "hr@10": 0.1000}
    ok, why = FIDELITY_BAR.check({"ndcg@10": 0.04976, "hr@10": 0.1001}, eager)
    assert ok, why
    ok, why = FIDELITY_BAR.check({"ndcg@10": 0.0487, "hr@10": 0.1}, eager)  # -2.6%
    assert not ok and "ndcg@10" in why and "-2.60%" in why
    ok, why = FIDELITY_BAR.check({"ndcg@10": 0.05}, eager)
    assert not ok and "hr@10 not measured" in why
    # eval data exists but the variant was not evaluated: its overlap does not stand in
    assert FIDELITY_BAR.check(None, eager, topk=1.0) == (False, "ndcg@10 not measured")
    assert FIDELITY_BAR.check(None, None, topk=0.994)[0]
    ok, why = FIDELITY_BAR.check(None, None, topk=0.972)
    assert not ok and "0.972" in why
    assert FIDELITY_BAR.check(None, None, None) == (False, "no fidelity measured")
