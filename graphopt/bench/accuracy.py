"""Evaluation data for the harness: held-out batches and targets, scored as
HR@k/NDCG@k, or held-out clicks, scored as AUC/logloss (CTR models);
:mod:`graphopt.metrics` defines the metrics and ranking drift."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.errors import GraphoptError
from graphopt.hits import user_hits
from graphopt.ir.program import positional
from graphopt.metrics import auc, hr_at_k, logloss, ndcg_at_k

__all__ = ["EvalData", "ClickEvalData", "evaluate", "evaluate_clicks", "make_evaluator", "quality_section"]

#: a variant's callable -> its metrics; an evaluator may add ``"per_user"``: a
#: :class:`graphopt.hits.UserHits` (the harness then reports which users' hits changed)
Evaluator = Callable[[Callable[..., Sequence[torch.Tensor]]], dict[str, Any]]


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
    def coerce(cls, data: Any, input_names: Sequence[str] | None = None) -> EvalData:
        """Accept an EvalData, a mapping or an object with ``batches``/``inputs``,
        ``targets`` and optional ``seen``. Dict batches are bound by ``input_names``
        where given (:func:`positional`), else taken in their own key order."""
        if isinstance(data, EvalData) and input_names is None:
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
        batches = [positional(b, input_names, f"eval_data batch {i}") for i, b in enumerate(batches)]
        return cls(batches, torch.as_tensor(targets), get("seen"), int(get("k", 10) or 10), str(get("name", "eval")))


@dataclass
class ClickEvalData:
    """Held-out impressions of a CTR model: input batches and one 0/1 click per
    row; the model's first output is one click logit per row. Scored as AUC
    and logloss (:func:`graphopt.metrics.auc`, :func:`graphopt.metrics.logloss`),
    which the fidelity bar then holds within 0.5% relative of eager's."""

    batches: list[tuple[torch.Tensor, ...]]
    labels: torch.Tensor
    name: str = "clicks"

    @classmethod
    def coerce(cls, data: Any, input_names: Sequence[str] | None = None) -> ClickEvalData:
        if isinstance(data, ClickEvalData) and input_names is None:
            return data
        get = data.get if isinstance(data, dict) else (lambda key, default=None: getattr(data, key, default))
        batches = get("batches") or get("inputs")
        if batches is None:
            raise GraphoptError("click eval_data needs input 'batches' (or 'inputs') and 'labels'; "
                                "see graphopt.bench.ClickEvalData")
        if isinstance(batches, tuple) and batches and isinstance(batches[0], torch.Tensor):
            batches = [batches]
        batches = [positional(b, input_names, f"eval_data batch {i}") for i, b in enumerate(batches)]
        return cls(batches, torch.as_tensor(get("labels")).float(), str(get("name", "clicks")))


def evaluate_clicks(fn: Callable[..., Sequence[torch.Tensor]], data: ClickEvalData) -> dict[str, float]:
    """AUC and logloss of the first output of ``fn`` (one click logit per row) over ``data``."""
    logits = torch.cat([fn(*batch)[0].detach().float().reshape(-1) for batch in data.batches])
    if logits.shape[0] != data.labels.numel():
        raise GraphoptError(
            f"click eval_data has {data.labels.numel()} labels but the batches give {logits.shape[0]} scores; "
            "pass one 0/1 click per input row to a model with one logit per row"
        )
    return {"auc": auc(logits, data.labels), "logloss": logloss(logits, data.labels)}


def evaluate(fn: Callable[..., Sequence[torch.Tensor]], data: EvalData, per_user: bool = False) -> dict[str, Any]:
    """HR@k and NDCG@k of the first output of ``fn`` over ``data`` (``per_user``: and
    each user's :class:`graphopt.hits.UserHits` under ``"per_user"``)."""
    scores = torch.cat([fn(*batch)[0].detach().float().reshape(len(batch[0]), -1) for batch in data.batches])
    if scores.shape[0] != data.targets.shape[0]:
        raise GraphoptError(
            f"eval_data has {data.targets.shape[0]} targets but the batches give {scores.shape[0]} rows; "
            "pass one target per input row"
        )
    k = data.k
    metrics: dict[str, Any] = {
        f"hr@{k}": hr_at_k(scores, data.targets, k, data.seen),
        f"ndcg@{k}": ndcg_at_k(scores, data.targets, k, data.seen),
    }
    if per_user:
        metrics["per_user"] = user_hits(scores, data.targets, k, data.seen)
    return metrics


def make_evaluator(eval_data: Any, per_user: bool = False, input_names: Sequence[str] | None = None) -> Evaluator:
    """``eval_data`` as a function of a variant's callable -> metrics.

    A callable is used as is (e.g. ``lambda f: graphopt.data.evaluate_ranking(f, split.test, ...)``);
    click data (a :class:`ClickEvalData`, or anything with ``labels``) is
    scored as AUC/logloss; anything else is coerced to :class:`EvalData`
    (dict batches bound by ``input_names``, the model's, where given).
    """
    if callable(eval_data) and not isinstance(eval_data, (EvalData, ClickEvalData)):
        return eval_data
    has_labels = isinstance(eval_data, ClickEvalData) or (
        eval_data.get("labels") is not None if isinstance(eval_data, dict) else getattr(eval_data, "labels", None) is not None)
    if has_labels:
        clicks = ClickEvalData.coerce(eval_data, input_names)
        return lambda fn: evaluate_clicks(fn, clicks)
    data = EvalData.coerce(eval_data, input_names)
    return lambda fn: evaluate(fn, data, per_user)


def quality_section(variants: Sequence[dict[str, Any]], reference: dict[str, float], k: int) -> list[str]:
    """The bench report's "Ranking quality on evaluation data" table (markdown lines): each
    variant's metrics and, where the evaluation was per user, which users' hits changed."""
    keys = list(reference)
    users = any(v.get("eval_users") for v in variants)
    extra = ["users gained / lost", "closest eager margin", "McNemar p"] if users else []
    lines = ["## Ranking quality on evaluation data", "", "| variant | " + " | ".join(keys + extra) + " |",
             "|---|" + "---|" * len(keys + extra)]
    for v in variants:
        if not v.get("eval"):
            continue
        cells = [f"{v['eval'].get(key, math.nan):.4f}" for key in keys]
        if users:
            changes = v.get("eval_users") or {}
            margin = changes.get("min_margin", math.nan)
            cells += ([f"+{int(changes['gained'])} / -{int(changes['lost'])}",
                       f"{margin:.2g}" if math.isfinite(margin) else "-",
                       f"{changes['p_value']:.2f}" if "p_value" in changes else "-"] if changes else ["-"] * 3)
        lines.append(f"| {v['name']} | " + " | ".join(cells) + " |")
    if users:
        lines += ["", f"Users gained / lost: evaluation users whose target entered / left the top {k} against "
                  "eager's; closest eager margin: the smallest gap, in eager's own scores, between such a user's "
                  "target and the top-k boundary: a gap below the variant's score error was a near-tie that any "
                  "16-bit variant can flip; McNemar p: the exact two-sided test of gained against lost users, how "
                  "likely so lopsided a split is if each changed user were a coin flip (large p: chance, not a "
                  "systematic loss; the fidelity bar itself is not relaxed by it)."]
    return lines + [""]
