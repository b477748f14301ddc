"""Evaluation: numeric drift, ranking drift, ranking quality, click prediction.

One definition of each metric, used by verify-each, the int8 accuracy guard,
the OptimizeReport, the bench harness and the tuner:

- numeric drift against a reference: :func:`max_abs_error`,
  :func:`allclose_report`, :func:`cosine`, :func:`drift`;
- ranking drift against a reference ranking (eager fp32's scores):
  :func:`topk_overlap`, :func:`spearman`, :func:`ndcg_vs_reference`,
  :func:`ranking_drift`, :func:`agreement`;
- ranking quality against held-out targets (leave-one-out):
  :func:`target_ranks`, :func:`hr_at_k`, :func:`ndcg_at_k`;
- click prediction quality against held-out clicks (CTR models):
  :func:`auc`, :func:`logloss`.

The fidelity bar a variant must meet to be called "best" (built on these) is
:mod:`graphopt.fidelity_bar`.

Scores are ``(rows, candidates)``: for item scorers the last dim is the items;
a one-score-per-row model (CTR, e.g. DLRM) ranks the rows of the batch, see
:func:`score_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "max_abs_error",
    "allclose_report",
    "cosine",
    "drift",
    "score_rows",
    "score_matrix",
    "topk_overlap",
    "spearman",
    "ndcg_vs_reference",
    "ranking_drift",
    "agreement",
    "AGREEMENT_METRICS",
    "target_ranks",
    "hr_at_k",
    "ndcg_at_k",
    "auc",
    "logloss",
]


# ------------------------------------------------------------ numeric drift
def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def allclose_report(
    outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], tol: float
) -> str | None:
    """None when every output is within ``tol`` (atol = rtol = tol) of the
    reference; otherwise a one-line reason naming the output and the error."""
    if len(outputs) != len(reference):
        return f"{len(outputs)} outputs, expected {len(reference)}"
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        if tuple(out.shape) != tuple(ref.shape):
            return f"output {i}: shape {list(out.shape)}, expected {list(ref.shape)}"
        if not ref.is_floating_point():
            if not torch.equal(out.to(ref.dtype), ref):
                return f"output {i}: integer values differ"
            continue
        o, r = out.detach().double(), ref.detach().double()
        finite = torch.isfinite(r)
        if not torch.isfinite(o[finite]).all():
            return f"output {i}: non-finite values appeared"
        # where the reference is inf or NaN no tolerance applies: same inf (sign included), or NaN for NaN
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
        if not same[~finite].all():
            bad = int((~same & ~finite).sum())
            return f"output {i}: {bad} value(s) differ where the reference is inf/NaN"
        o, r = o[finite], r[finite]
        err = (o - r).abs()
        bound = tol + tol * r.abs()
        if (err > bound).any():
            return f"output {i}: max abs error {float(err.max()):.3g} exceeds tolerance {tol:g}"
    return None


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    denom = float(a.norm() * b.norm())
    if denom == 0.0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float(a @ b) / denom


def drift(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], k: int = 10) -> dict[str, float]:
    """Max abs/rel error and cosine over all outputs; top-k overlap of the
    first output when it scores items (last dim > k)."""
    max_abs = max_rel = 0.0
    cos = 1.0
    for out, ref in zip(outputs, reference):
        if not ref.is_floating_point():
            continue
        err = max_abs_error(out, ref)
        scale = float(ref.detach().double().abs().max()) if ref.numel() else 0.0
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale else 0.0)
        cos = min(cos, cosine(out, ref))
    result = {"max_abs": max_abs, "max_rel": max_rel, "cosine": cos}
    if reference and reference[0].is_floating_point() and reference[0].dim() >= 1 and reference[0].shape[-1] > k:
        result[f"top{k}_overlap"] = topk_overlap(outputs[0], reference[0], k)
    return {key: (v if math.isfinite(v) else float("nan")) for key, v in result.items()}


# ------------------------------------------------------------ ranking drift
def score_rows(out: torch.Tensor) -> torch.Tensor:
    """``(rows, candidates)`` float scores: the last dim ranks items; a
    ``(batch,)`` or ``(batch, 1)`` score column ranks the batch's rows."""
    out = out.detach().float()
    if out.dim() == 0:
        return out.reshape(1, 1)
    if out.dim() <= 2 and out.numel() == out.shape[0]:
        return out.reshape(1, -1)
    return out.reshape(-1, out.shape[-1])


def score_matrix(out: torch.Tensor, k: int) -> tuple[torch.Tensor, str] | None:
    """:func:`score_rows` and what is ranked (``"items"``/``"batch"``) when there
    are more than ``k`` candidates to rank; None when there is nothing to rank."""
    if not out.is_floating_point() or out.dim() == 0:
        return None
    rows = score_rows(out)
    if rows.shape[-1] <= k:
        return None
    over = "batch" if out.dim() <= 2 and out.numel() == out.shape[0] else "items"
    return rows, over


def topk_overlap(scores: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """Mean |topk(scores) ∩ topk(reference)| / k over rows (last dim = candidates)."""
    if scores.dim() == 1:
        scores, reference = scores[None], reference[None]
    k = min(k, scores.shape[-1])
    a = scores.float().reshape(-1, scores.shape[-1]).topk(k, dim=-1).indices
    b = reference.float().reshape(-1, reference.shape[-1]).topk(k, dim=-1).indices
    hits = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1).double()
    return float((hits / k).mean())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Spearman rank correlation between rows of ``a`` and ``b`` (last dim = candidates)."""
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


def ndcg_vs_reference(scores: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """NDCG@k of ``scores``' ranking, taking the reference's top k as the truth.

    Gain: the reference's i-th best candidate (0-based) has relevance ``k - i``,
    every other candidate 0; discount ``1/log2(position + 2)``. Linear graded
    relevance (rather than a second logarithmic decay) keeps swaps among the
    lower half of the top k visible, which is what a ranking guard needs to see.
    The ideal DCG is the reference's own ordering, so identical rankings score
    1.0 and a ranking with none of the reference's top k scores 0.0. Mean over
    rows (last dim = candidates).
    """
    if scores.dim() == 1:
        scores, reference = scores[None], reference[None]
    scores = scores.float().reshape(-1, scores.shape[-1])
    reference = reference.float().reshape(-1, reference.shape[-1])
    k = min(k, scores.shape[-1])
    discounts = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)
    ref_top = reference.topk(k, dim=-1).indices
    relevance = torch.zeros_like(reference, dtype=torch.float64)
    relevance.scatter_(1, ref_top, torch.arange(k, 0, -1, dtype=torch.float64).expand_as(ref_top).contiguous())
    got = relevance.gather(1, scores.topk(k, dim=-1).indices)
    ideal = torch.arange(k, 0, -1, dtype=torch.float64)
    return float(((got * discounts).sum(-1) / (ideal * discounts).sum()).mean())


def ranking_drift(
    outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], k: int = 10
) -> dict[str, Any]:
    """Numeric drift (max abs/rel error, cosine) plus, where there is something
    to rank, top-k overlap, Spearman rank correlation and NDCG@k vs the reference."""
    outputs = [o.detach().float() if o.is_floating_point() else o for o in outputs]
    reference = [r.detach().float() if r.is_floating_point() else r for r in reference]
    result: dict[str, Any] = {
        key: v for key, v in drift(outputs, reference, k).items() if not key.startswith("top")
    }
    if not reference:
        return result
    ref = score_matrix(reference[0], k)
    out = score_matrix(outputs[0], k) if ref is not None else None
    if ref is not None and out is not None:
        (r, over), (o, _) = ref, out
        result["ranked_over"] = over
        result["topk_overlap"] = topk_overlap(o, r, k)
        result["spearman"] = spearman(o, r)
        result["ndcg_vs_eager"] = ndcg_vs_reference(o, r, k)
    return {key: (v if not isinstance(v, float) or math.isfinite(v) else float("nan")) for key, v in result.items()}


AGREEMENT_METRICS = ("topk_overlap", "cosine", "ndcg")


def agreement(metric: str, outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], k: int = 10) -> float:
    """Agreement of ``outputs`` with ``reference`` on the first output, 1.0 = identical.

    ``topk_overlap``/``ndcg`` (:func:`ndcg_vs_reference`) rank the rows of
    :func:`score_rows`; ``cosine`` compares all values.
    """
    out, ref = score_rows(outputs[0]), score_rows(reference[0])
    if metric == "cosine":
        return cosine(out, ref)
    if metric == "topk_overlap":
        return topk_overlap(out, ref, k)
    if metric == "ndcg":
        return ndcg_vs_reference(out, ref, k)
    raise ValueError(f"unknown metric {metric!r}; one of {', '.join(AGREEMENT_METRICS)}")


# --------------------------------------------- ranking quality vs held-out targets
def target_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among the unmasked items (ties count against it).

    ``scores`` is ``(users, items)`` with column ``i`` = item id ``i``;
    ``targets`` the held-out item id per user; ``seen`` an optional boolean
    ``(users, items)`` mask of items to exclude (already interacted, padding).
    """
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


# ------------------------------------------------ click prediction vs held-out clicks
def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores
    above a random negative, a tie counting one half.

    Exact and rank-based (the Mann-Whitney U statistic): sort once, give tied
    scores their average rank, ``U = sum(ranks of positives) - P (P + 1) / 2``,
    ``AUC = U / (P N)``. NaN when the labels hold only one class or a score is
    NaN (a broken variant must not look like a coin flip).
    """
    s = scores.detach().double().flatten()
    y = labels.detach().flatten() > 0.5
    if s.shape != y.shape:
        raise ValueError(f"auc: {s.numel()} scores but {y.numel()} labels")
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0 or bool(torch.isnan(s).any()):
        return float("nan")
    sorted_s, order = s.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts + 1  # 1-based rank of each tie group's first member
    ranks = torch.empty_like(s)
    ranks[order] = (first + (counts - 1) / 2.0).double()[inverse]
    u = float(ranks[y].sum()) - pos * (pos + 1) / 2.0
    return u / (pos * neg)


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy (natural log) of click **logits** against 0/1
    labels: ``mean(softplus(z) - y z)``, computed from the logit so a
    confident score does not overflow to ``log(0)``."""
    z = logits.detach().double().flatten()
    y = labels.detach().double().flatten()
    if z.shape != y.shape:
        raise ValueError(f"logloss: {z.numel()} logits but {y.numel()} labels")
    if z.numel() == 0:
        return float("nan")
    return float((torch.nn.functional.softplus(z) - y * z).mean())
