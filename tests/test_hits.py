"""Per-user hits and their distance from the top-k boundary (graphopt.hits), by hand."""

from __future__ import annotations

import math

import pytest
import torch

from graphopt.hits import hit_changes, mcnemar_exact, user_hits
from graphopt.metrics import hr_at_k


def test_hits_and_margins_by_hand_with_seen_items_masked():
    # items 0..5, k = 2; user 0's target 3 is second behind item 1 (item 5, seen, would beat both)
    scores = torch.tensor([[0.0, 0.9, 0.2, 0.7, 0.65, 5.0],
                           [0.0, 0.1, 0.8, 0.3, 0.5, 0.4]])
    targets = torch.tensor([3, 3])
    seen = torch.zeros(2, 6, dtype=torch.bool)
    seen[0, 5] = True
    got = user_hits(scores, targets, 2, seen)
    assert got.hits.tolist() == [True, False]
    # user 0: hit, lead over the best item outside the top 2 (item 4, 0.65): 0.05
    # user 1: miss, gap to the 2nd best other item (item 4, 0.5): 0.2
    assert got.margins.tolist() == pytest.approx([0.05, 0.2], abs=1e-6)
    assert got.hits.double().mean().item() == pytest.approx(hr_at_k(scores, targets, 2, seen))


def test_a_tie_is_a_miss_with_zero_margin_and_too_few_items_is_an_infinite_margin():
    tie = user_hits(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), torch.tensor([3]), 2)
    assert tie.hits.tolist() == [False] and tie.margins.tolist() == [0.0]  # ties count against the target
    few = torch.tensor([[0.0, 0.3, 0.9]])
    seen = torch.tensor([[True, False, True]])  # one other item left for k = 2
    got = user_hits(few, torch.tensor([1]), 2, seen)
    assert got.hits.tolist() == [True] and math.isinf(got.margins.item())


def test_hit_changes_counts_both_ways_and_reports_the_closest_reference_margin():
    scores = torch.tensor([[0.0, 0.9, 0.2, 0.7, 0.65, 0.1],
                           [0.0, 0.1, 0.8, 0.3, 0.5, 0.4],
                           [0.0, 0.9, 0.8, 0.1, 0.2, 0.3]])
    targets = torch.tensor([3, 3, 1])
    ref = user_hits(scores, targets, 2)
    moved = scores.clone()
    moved[0, 4] = 0.75  # user 0 loses its hit (its target led item 4 by 0.05)
    moved[1, 3] = 0.6   # user 1 gains one (its target trailed by 0.2)
    changes = hit_changes(ref, user_hits(moved, targets, 2))
    assert changes == {"gained": 1.0, "lost": 1.0, "min_margin": pytest.approx(0.05, abs=1e-6), "p_value": 1.0}
    same = hit_changes(ref, user_hits(scores + 1e-3, targets, 2))
    assert same["gained"] == same["lost"] == 0.0 and math.isnan(same["min_margin"])
    with pytest.raises(ValueError, match="users"):
        hit_changes(ref, user_hits(scores[:2], targets[:2], 2))


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(0, 1) == 1.0 and mcnemar_exact(1, 1) == 1.0
    assert mcnemar_exact(0, 2) == pytest.approx(0.5)  # 2 * P(X <= 0), n = 2: 2 * 1/4
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # the torch.compile-bf16 peer on the fine-tuned gpt-rec
    assert mcnemar_exact(1, 9) == mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)  # symmetric
