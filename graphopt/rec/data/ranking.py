"""Sequence inputs and leave-one-out ranking evaluation: encode histories,
score every item, HR@k/NDCG@k with seen items masked, the popularity baseline."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from graphopt.hits import user_hits
from graphopt.metrics import hr_at_k, ndcg_at_k
from graphopt.rec.data.movielens import DataError, EvalSet, Split

__all__ = ["encode_histories", "item_scores", "evaluate_ranking", "popularity_metrics"]

log = logging.getLogger(__name__)


def encode_histories(
    histories: Sequence[Sequence[int]], seq_len: int, append_mask: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of the most recent items.

    With ``append_mask`` (the [mask] id of BERT4Rec) the last position holds
    that token and the history gets ``seq_len - 1`` slots.
    """
    room = seq_len - (1 if append_mask is not None else 0)
    ids = torch.zeros(len(histories), seq_len, dtype=torch.long)
    mask = torch.zeros(len(histories), seq_len, dtype=torch.long)
    for row, hist in enumerate(histories):
        tail = list(hist[-room:]) if room > 0 else []
        if append_mask is not None:
            tail.append(append_mask)
        if tail:
            ids[row, seq_len - len(tail):] = torch.tensor(tail)
            mask[row, seq_len - len(tail):] = 1
    return ids, mask


def item_scores(out: torch.Tensor, num_items: int) -> torch.Tensor:
    """Model output -> ``(batch, num_items + 1)`` float scores, column ``i`` = item ``i``.

    BERT4Rec already scores ids ``0..num_items``; a classifier over
    ``num_items`` labels (label ``j`` = item ``j + 1``) gets a padding column.
    """
    out = out.float()
    if out.shape[-1] == num_items + 1:
        return out
    if out.shape[-1] == num_items:
        return torch.cat([torch.zeros(out.shape[0], 1), out], dim=1)
    raise DataError(f"model scores have {out.shape[-1]} columns; expected {num_items} or {num_items + 1} items")


def _batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)


def evaluate_ranking(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cases: EvalSet,
    num_items: int,
    *,
    seq_len: int,
    append_mask: int | None = None,
    k: int = 10,
    batch_size: int = 128,
    fixed_batch: bool = False,
    per_user: bool = False,
) -> dict[str, Any]:
    """HR@k and NDCG@k of ``score_fn(input_ids, attention_mask)`` over all items.

    Seen items are masked. ``fixed_batch`` pads the last batch to
    ``batch_size`` rows (for runtimes with a static batch dimension).
    ``per_user`` adds each user's hit and distance from the top-k boundary
    (:class:`graphopt.hits.UserHits`) under ``"per_user"``.
    """
    ids, mask = encode_histories(cases.histories, seq_len, append_mask)
    parts = []
    for start, stop in _batches(len(cases), batch_size):
        b_ids, b_mask = ids[start:stop], mask[start:stop]
        rows = stop - start
        if fixed_batch and rows < batch_size:
            reps = math.ceil(batch_size / rows)
            b_ids = b_ids.repeat(reps, 1)[:batch_size]
            b_mask = b_mask.repeat(reps, 1)[:batch_size]
        out = score_fn(b_ids, b_mask)
        if isinstance(out, (tuple, list)):
            out = out[0]
        parts.append(item_scores(torch.as_tensor(out)[:rows], num_items))
    scores = torch.cat(parts) if parts else torch.zeros(0, num_items + 1)
    broken = int(torch.isnan(scores).any(dim=1).sum())
    if broken:  # NaN compares false everywhere and would rank a target first
        log.warning("%d of %d users got NaN scores; they count as misses", broken, len(scores))
        scores = torch.nan_to_num(scores, nan=-math.inf)
    metrics: dict[str, Any] = {
        f"hr@{k}": hr_at_k(scores, cases.targets, k, cases.seen),
        f"ndcg@{k}": ndcg_at_k(scores, cases.targets, k, cases.seen),
        "users": float(len(cases)),
    }
    if per_user:
        metrics["per_user"] = user_hits(scores, cases.targets, k, cases.seen)
    return metrics


def popularity_metrics(split: Split, cases: str = "test", k: int = 10) -> dict[str, float]:
    """The most-popular baseline: rank items by training-interaction count.

    For the test cases the validation targets count as seen training data.
    """
    counts = torch.zeros(split.num_items + 1)
    for seq in split.train:
        if seq:
            counts.index_add_(0, torch.tensor(seq, dtype=torch.long), torch.ones(len(seq)))
    evalset = split.valid if cases == "valid" else split.test
    if cases != "valid":
        counts.index_add_(0, split.valid.targets, torch.ones(len(split.valid)))
    scores = counts.expand(len(evalset), -1)
    return {
        f"hr@{k}": hr_at_k(scores, evalset.targets, k, evalset.seen),
        f"ndcg@{k}": ndcg_at_k(scores, evalset.targets, k, evalset.seen),
        "users": float(len(evalset)),
    }
