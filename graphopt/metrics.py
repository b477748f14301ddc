"""Ranking-quality metrics for recommenders (leave-one-out evaluation).

``scores`` is ``(users, items)`` with column ``i`` = item id ``i``;
``targets`` the held-out item id per user; ``seen`` an optional boolean
``(users, items)`` mask of items to exclude (already interacted, padding).
"""

from __future__ import annotations

import math

import torch

__all__ = ["target_ranks", "hr_at_k", "ndcg_at_k", "spearman"]


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among the unmasked items (ties count against it)."""
    scores = scores.float().clone()
    scores[torch.isnan(scores)] = -math.inf  # a NaN score never ranks an item up
    if seen is not None:
        seen = seen.clone()
        seen[torch.arange(len(targets)), targets] = False  # never mask the target itself
        scores[seen] = -math.inf
    target_scores = scores.gather(1, targets.view(-1, 1))
    ties = (scores == target_scores).sum(dim=1) - 1
    return (scores > target_scores).sum(dim=1) + ties.clamp_min(0)


def hr_at_k(scores: torch.Tensor, targets: torch.Tensor, k: int = 10, seen: torch.Tensor | None = None) -> float:
    """Hit rate: fraction of users whose target ranks in the top k."""
    ranks = target_ranks(scores, targets, seen)
    return float((ranks < k).double().mean())


def ndcg_at_k(scores: torch.Tensor, targets: torch.Tensor, k: int = 10, seen: torch.Tensor | None = None) -> float:
    """NDCG@k with one relevant item per user: mean of 1/log2(rank+2) over hits."""
    ranks = target_ranks(scores, targets, seen).double()
    gains = torch.where(ranks < k, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
    return float(gains.mean())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Spearman rank correlation between rows of ``a`` and ``b`` (last dim = items)."""
    if a.dim() == 1:
        a, b = a[None], b[None]
    a = a.double().reshape(-1, a.shape[-1])
    b = b.double().reshape(-1, b.shape[-1])
    ra = a.argsort(dim=1).argsort(dim=1).double()
    rb = b.argsort(dim=1).argsort(dim=1).double()
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    return float(((ra * rb).sum(dim=1) / denom).mean())
