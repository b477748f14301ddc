"""graphopt.metrics: one definition of each metric, and the fidelity bar."""

from __future__ import annotations

import math

import pytest
import torch

from graphopt.fidelity_bar import FIDELITY_BAR, relative_change, shown_against
from graphopt.metrics import agreement, auc, logloss, ndcg_vs_reference, ranking_drift, score_rows


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


def test_a_metric_eager_scores_zero_on_is_judged_by_the_top_k_overlap():
    """Was: eager at HR@10 = NDCG@10 = 0 (a tiny model, a few users) made every variant's change 0%, so an
    int8 variant at top-10 overlap 0.988 met the bar and could be starred."""
    eager = {"ndcg@10": 0.0, "hr@10": 0.0}
    ok, why = FIDELITY_BAR.check({"ndcg@10": 0.0, "hr@10": 0.0}, eager, topk=0.988)
    assert not ok and why == "eager's ndcg@10 is 0 on the evaluation data (nothing to hold); top-10 overlap 0.988 < 0.99"
    assert FIDELITY_BAR.check({"ndcg@10": 0.0, "hr@10": 0.0}, eager, topk=0.995) == (True, "")
    assert FIDELITY_BAR.check({"ndcg@10": 0.01, "hr@10": 0.02}, eager, topk=1.0) == (True, "")  # hits gained
    assert not FIDELITY_BAR.check({"ndcg@10": 0.0, "hr@10": 0.0}, eager)[0]  # no overlap measured: not met
    assert FIDELITY_BAR.check(None, eager, topk=1.0) == (False, "ndcg@10 not measured")
    # near miss: only the zero metric falls back; the other is held to its 0.5% as before
    ok, why = FIDELITY_BAR.check({"ndcg@10": 0.0, "auc": 0.70}, {"ndcg@10": 0.0, "auc": 0.75}, topk=1.0)
    assert not ok and why.startswith("auc -6.67% vs eager")
    # a lower-is-better metric at 0 is a perfect score, not an empty one
    assert FIDELITY_BAR.check({"logloss": 0.0}, {"logloss": 0.0})[0]


def test_a_near_miss_is_never_shown_on_the_bar():
    # three decimals would print 0.990 for a 0.9898 overlap that misses the 0.99 bar, two
    # would print -0.50% for a -0.503% change that misses the 0.5% one: more digits then
    assert FIDELITY_BAR.check(None, None, topk=0.98984375) == (False, "top-10 overlap 0.9898 < 0.99")
    ok, why = FIDELITY_BAR.check({"ndcg@10": 0.049748}, {"ndcg@10": 0.05})  # -0.504%
    assert not ok and why == "ndcg@10 -0.504% vs eager (bar -0.5%)"
    # values clear of the bar, and one exactly on it (it meets the bar), keep the usual digits
    assert [FIDELITY_BAR.show_overlap(x) for x in (0.9953, 0.972, 0.99, 1.0)] == ["0.995", "0.972", "0.990", "1.000"]
    assert [FIDELITY_BAR.show_change(x) for x in (-0.33, -0.5, -0.63, 0.0, 0.291)] == [
        "-0.33", "-0.50", "-0.63", "+0.00", "+0.29"]
    assert shown_against(0.98999, 0.99, 3) == "0.98999" and shown_against(-0.5001, -0.5, 2, sign=True) == "-0.5001"


# ------------------------------------------------------------------ AUC and logloss
def test_auc_hand_computed_with_and_without_ties():
    # 4 (positive, negative) pairs: 0.35 < 0.4 is the one misordered pair -> 3/4
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # positives {0.5, 0.9}, negatives {0.5, 0.2}: the tie 0.5 = 0.5 counts 1/2 -> (0.5 + 1 + 1 + 1) / 4
    assert auc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([1, 0, 0, 1])) == pytest.approx(0.875)
    assert auc(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1, 0, 1])) == pytest.approx(0.5)  # all tied
    assert auc(torch.tensor([3.0, 1.0]), torch.tensor([1, 0])) == 1.0
    assert auc(torch.tensor([1.0, 3.0]), torch.tensor([1, 0])) == 0.0


def test_auc_equals_the_pairwise_definition_on_random_tied_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (300,), generator=g).float()  # many ties
    labels = torch.rand(300, generator=g) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert auc(scores, labels) == pytest.approx(float(pairwise), abs=1e-12)


def test_auc_is_nan_for_one_class_or_nan_scores():
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    assert math.isnan(auc(torch.tensor([0.1, float("nan")]), torch.tensor([1, 0])))


def test_logloss_hand_computed_and_stable_for_confident_logits():
    # p = sigmoid(0) = 0.5 for a click, p = sigmoid(ln 3) = 0.75 for a non-click: (ln 2 + ln 4) / 2
    assert logloss(torch.tensor([0.0, math.log(3.0)], dtype=torch.float64), torch.tensor([1.0, 0.0])) == pytest.approx(
        (math.log(2) + math.log(4)) / 2, rel=1e-9)
    assert logloss(torch.tensor([200.0, -200.0]), torch.tensor([1.0, 0.0])) == pytest.approx(0.0, abs=1e-12)
    assert logloss(torch.tensor([200.0]), torch.tensor([0.0])) == pytest.approx(200.0)  # not inf


def test_fidelity_bar_on_auc_and_logloss():
    eager = {"auc": 0.7700, "logloss": 0.5500}
    assert FIDELITY_BAR.check({"auc": 0.7680, "logloss": 0.5520}, eager)[0]  # -0.26%, +0.36%
    ok, why = FIDELITY_BAR.check({"auc": 0.7700, "logloss": 0.5540}, eager)  # logloss 0.73% worse
    assert not ok and why.startswith("logloss")
    ok, why = FIDELITY_BAR.check({"auc": 0.7650, "logloss": 0.5400}, eager)  # better logloss, AUC -0.65%
    assert not ok and why.startswith("auc")
