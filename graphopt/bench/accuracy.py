"""Accuracy of a variant against eager fp32: numeric drift, ranking drift, and
HR@k/NDCG@k when evaluation data is given.

Ranking drift is measured on the item scores: the first output when its last
dim scores items (more than ``k`` columns); for one-score-per-row models
(CTR, e.g. DLRM) the rows of the batch are the candidates being ranked, so
top-k and rank correlation are taken over the batch when it has more than
``k`` rows. Otherwise only the numeric drift is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.compare import drift, topk_overlap
from graphopt.errors import GraphoptError
from graphopt.metrics import hr_at_k, ndcg_at_k, spearman

__all__ = ["score_matrix", "ndcg_vs_reference", "ranking_drift", "EvalData", "evaluate", "make_evaluator"]

Evaluator = Callable[[Callable[..., Sequence[torch.Tensor]]], dict[str, float]]


def score_matrix(out: torch.Tensor, k: int) -> tuple[torch.Tensor, str] | None:
    """``(rows, candidates)`` scores and what is ranked (``"items"``/``"batch"``), or None."""
    if not out.is_floating_point() or out.dim() == 0:
        return None
    if out.dim() >= 1 and out.shape[-1] > k:
        return out.reshape(-1, out.shape[-1]), "items"
    if out.dim() <= 2 and out.numel() == out.shape[0] and out.shape[0] > k:
        return out.reshape(1, -1), "batch"
    return None


def ndcg_vs_reference(scores: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """NDCG@k of ``scores``' ranking, taking the reference's top k as the truth.

    The reference's i-th best item (0-based) has relevance ``k - i``; every
    other item 0. The ideal DCG is the reference's own ordering, so identical
    rankings score 1.0 and a ranking with none of the reference's top k scores
    0.0. Mean over rows (last dim = candidates).
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


@dataclass
class EvalData:
    """Leave-one-out evaluation data: input batches, the held-out item per row,
    and an optional mask of items to exclude (already seen). Row order of the
    concatenated batches matches ``targets``; score column i = item id i."""

    batches: list[tuple[torch.Tensor, ...]]
    targets: torch.Tensor
    seen: torch.Tensor | None = None
    k: int = 10
    name: str = "eval"

    @classmethod
    def coerce(cls, data: Any) -> EvalData:
        """Accept an EvalData, a mapping or an object with ``batches``/``inputs``,
        ``targets`` and optional ``seen``."""
        if isinstance(data, EvalData):
            return data
        get = data.get if isinstance(data, dict) else (lambda key, default=None: getattr(data, key, default))
        batches = get("batches") or get("inputs")
        targets = get("targets")
        if batches is None or targets is None:
            raise GraphoptError(
                "eval_data needs input 'batches' (or 'inputs') and 'targets'; see graphopt.bench.EvalData"
            )
        if isinstance(batches, tuple) and batches and isinstance(batches[0], torch.Tensor):
            batches = [batches]
        batches = [tuple(b.values()) if isinstance(b, dict) else tuple(b) for b in batches]
        return cls(batches, torch.as_tensor(targets), get("seen"), int(get("k", 10) or 10), str(get("name", "eval")))


def evaluate(fn: Callable[..., Sequence[torch.Tensor]], data: EvalData) -> dict[str, float]:
    """HR@k and NDCG@k of the first output of ``fn`` over ``data``."""
    scores = torch.cat([fn(*batch)[0].detach().float().reshape(len(batch[0]), -1) for batch in data.batches])
    if scores.shape[0] != data.targets.shape[0]:
        raise GraphoptError(
            f"eval_data has {data.targets.shape[0]} targets but the batches give {scores.shape[0]} rows; "
            "pass one target per input row"
        )
    k = data.k
    return {
        f"hr@{k}": hr_at_k(scores, data.targets, k, data.seen),
        f"ndcg@{k}": ndcg_at_k(scores, data.targets, k, data.seen),
    }


def make_evaluator(eval_data: Any) -> Evaluator:
    """``eval_data`` as a function of a variant's callable -> metrics.

    A callable is used as is (e.g. ``lambda f: graphopt.data.evaluate_ranking(f, split.test, ...)``);
    anything else is coerced to :class:`EvalData`.
    """
    if callable(eval_data) and not isinstance(eval_data, EvalData):
        return eval_data
    data = EvalData.coerce(eval_data)
    return lambda fn: evaluate(fn, data)
