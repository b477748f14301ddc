"""Which evaluation users a variant's ranking changes, and how close to a tie they were.

HR@10 moves in steps of one user: on MovieLens-100K's 943 test users, with 80
to 160 hits, one hit is 0.6-1.2% of HR@10, more than the 0.5% bar, so "within
0.5% of eager" means "no net lost hit", and one user whose target sat on the
top-10 boundary decides it. :func:`user_hits` keeps, per user, the hit and the target's
distance from that boundary in the model's own scores; :func:`hit_changes`
says which users a variant gained and lost against the reference (eager) and
the smallest reference margin among them: a lost user whose margin is below
the variant's score error (bf16 rounds at about 4e-3 relative) was a tie that
any 16-bit variant can flip, not a systematic loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphopt.metrics import target_ranks

__all__ = ["UserHits", "user_hits", "hit_changes", "mcnemar_exact"]


@dataclass(frozen=True)
class UserHits:
    """Per evaluation user: ``hits`` (target in the top k, bool) and ``margins``
    (the target's score minus the k-th best other unmasked item's, absolute;
    ``inf`` where fewer than k other items are left)."""

    hits: torch.Tensor
    margins: torch.Tensor
    k: int


def user_hits(scores: torch.Tensor, targets: torch.Tensor, k: int = 10, seen: torch.Tensor | None = None) -> UserHits:
    """:class:`UserHits` of ``(users, items)`` scores, as :func:`graphopt.metrics.hr_at_k` ranks them.

    A user's hit is ``target score > the k-th best other item's score`` (ties
    count against the target), so a change of the scores smaller than half the
    margin cannot flip it.
    """
    hits = target_ranks(scores, targets, seen) < k
    others = scores.float().clone()
    others[torch.isnan(others)] = -math.inf
    rows = torch.arange(len(targets))
    target = others[rows, targets].clone()
    if seen is not None:
        others[seen] = -math.inf
    others[rows, targets] = -math.inf
    if others.shape[1] < k:
        return UserHits(hits, torch.full_like(target, math.inf), k)
    kth = others.topk(k, dim=1).values[:, -1]
    margins = torch.where(torch.isinf(kth) & (kth < 0), torch.full_like(target, math.inf), (target - kth).abs())
    return UserHits(hits, margins, k)


def hit_changes(reference: UserHits, variant: UserHits) -> dict[str, float]:
    """Users whose hit ``variant`` gained and lost against ``reference``, the
    smallest reference margin among those users (NaN when none changed), and
    ``p_value``: the exact two-sided McNemar test of gained against lost (1.0 when
    none changed): how likely so lopsided a split is if each changed user were a
    coin flip (one lost user: 1.0; five lost, none gained: 0.06)."""
    if reference.hits.shape != variant.hits.shape:
        raise ValueError(f"per-user results of {variant.hits.numel()} users against {reference.hits.numel()}")
    gained = variant.hits & ~reference.hits
    lost = reference.hits & ~variant.hits
    changed = gained | lost
    closest = float(reference.margins[changed].min()) if bool(changed.any()) else math.nan
    g, lo = int(gained.sum()), int(lost.sum())
    return {"gained": float(g), "lost": float(lo), "min_margin": closest, "p_value": mcnemar_exact(g, lo)}


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: ``P(min(X, n - X) <= min(gained, lost))``, ``X ~ Binomial(n, 1/2)``."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)
