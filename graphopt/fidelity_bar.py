"""The fidelity bar: what "keeps the ranking" means when a best variant is chosen.

:class:`FidelityBar` (the project's :data:`FIDELITY_BAR`), the signed
:func:`relative_change` it judges metrics by, and :func:`shown_against`, which
prints a value without rounding a miss onto the bar. Used by the bench report,
the demo, the int8 accuracy guard and the tuner; the metrics themselves are
:mod:`graphopt.metrics`'.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from graphopt.metrics import score_matrix

__all__ = ["relative_change", "shown_against", "FidelityBar", "FIDELITY_BAR"]

#: metrics where lower is better (the rest: higher is better)
_LOWER_IS_BETTER = ("logloss", "loss", "mse")


def _lower_is_better(key: str) -> bool:
    return key.split("@")[0].lower() in _LOWER_IS_BETTER


def relative_change(value: float, reference: float, key: str = "") -> float:
    """Signed relative change of ``value`` vs ``reference`` in percent, where a
    negative number is always worse (for logloss, a higher value is worse)."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return float("nan") if value != reference else 0.0
    change = 100.0 * (value - reference) / abs(reference)
    return (-change if _lower_is_better(key) else change) + 0.0  # + 0.0: never a -0.0 ("-0.00%" read as worse)


def shown_against(value: float, bound: float, digits: int, sign: bool = False) -> str:
    """``value`` to ``digits`` decimals, or up to three more where fewer would show it on the other side
    of ``bound``: 0.9898 against the 0.99 bar, -0.503 against -0.5 (``sign``: a + on positive values)."""
    below, text = value < bound, ""
    for places in range(digits, digits + 4):
        text = f"{value:{'+' if sign else ''}.{places}f}"
        if (float(text) < bound) == below:
            break
    return text


@dataclass(frozen=True)
class FidelityBar:
    """What "keeps the ranking" means when a best variant is chosen.

    With evaluation data (held-out targets): every quality metric eager
    reports (NDCG@10, HR@10; AUC and logloss for CTR models) stays within
    ``max_rel_drop`` (0.5%) relative of eager's; a metric eager scores 0 on
    (no hit: nothing to hold) is judged by the top-k overlap instead. Without: the top-k overlap
    with eager fp32 on the bench inputs is at least ``min_topk_overlap``
    (0.99). Where eager was evaluated, a variant must be too (its top-k overlap
    does not stand in). A variant with neither measured does not meet the bar.
    """

    max_rel_drop: float = 0.005
    min_topk_overlap: float = 0.99
    k: int = 10
    #: where the outputs rank nothing (one score per row and few rows): cosine with eager
    min_cosine: float = 0.999

    def check(
        self,
        eval_metrics: Mapping[str, float] | None,
        eager_eval: Mapping[str, float] | None,
        topk: float | None = None,
    ) -> tuple[bool, str]:
        """(meets the bar, why not). ``eval_metrics``/``eager_eval`` map metric
        names (``ndcg@10``) to values; ``topk`` is the top-k overlap with eager."""
        keys = [key for key, v in (eager_eval or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)]
        # eager scoring 0 (no hit among the users) leaves nothing to hold: the top-k overlap judges instead
        zero = [key for key in keys if float(eager_eval[key]) == 0 and not _lower_is_better(key)]  # type: ignore[index]
        if zero:
            if topk is None or not math.isfinite(topk):
                return False, f"eager's {zero[0]} is 0 on the evaluation data (nothing to hold) and no top-{self.k} overlap"
            if topk < self.min_topk_overlap - 1e-12:
                return False, (f"eager's {zero[0]} is 0 on the evaluation data (nothing to hold); top-{self.k} "
                               f"overlap {self.show_overlap(topk)} < {self.min_topk_overlap:g}")
        if keys:
            for key in keys:
                value = (eval_metrics or {}).get(key)
                if value is None or not math.isfinite(value):
                    return False, f"{key} not measured"
                if key in zero:
                    continue
                change = relative_change(float(value), float(eager_eval[key]), key)  # type: ignore[index]
                if not change >= -100.0 * self.max_rel_drop - 1e-9:
                    return False, (f"{key} {self.show_change(change)}% vs eager "
                                   f"(bar -{100 * self.max_rel_drop:g}%)")
            return True, ""
        if topk is not None and math.isfinite(topk):
            if topk >= self.min_topk_overlap - 1e-12:
                return True, ""
            return False, f"top-{self.k} overlap {self.show_overlap(topk)} < {self.min_topk_overlap:g}"
        return False, "no fidelity measured"

    def judgeable(self, reference: Mapping[str, float] | None) -> dict[str, float]:
        """``reference`` without the metrics eager scores 0 on (no hit: nothing to hold), for a check
        whose top-k agreement is held elsewhere (the int8 guard's calibration batches)."""
        return {k: v for k, v in (reference or {}).items()
                if not (isinstance(v, (int, float)) and v == 0 and not _lower_is_better(k))}

    def show_overlap(self, topk: float) -> str:
        """A top-k overlap to three decimals, more where three would round a miss onto the bar."""
        return shown_against(topk, self.min_topk_overlap, 3)

    def show_change(self, change_pct: float) -> str:
        """A signed relative change in percent to two decimals, more where two would round
        a miss onto the bar (no % sign)."""
        return shown_against(change_pct, -100.0 * self.max_rel_drop, 2, sign=True)

    def agreement_target(self, reference: Sequence[torch.Tensor]) -> tuple[str, float]:
        """The bar for outputs without evaluation data, as an :func:`agreement` metric
        and its minimum: ``("topk_overlap", 0.99)`` where the first output ranks more
        than ``k`` candidates (items, or a batch of one-score rows), else
        ``("cosine", 0.999)``. The bench and the int8 accuracy guard use this."""
        if reference and score_matrix(reference[0], self.k) is not None:
            return "topk_overlap", self.min_topk_overlap
        return "cosine", self.min_cosine

    def describe(self) -> str:
        return (f"NDCG@{self.k}/HR@{self.k} (AUC/logloss for CTR) within {100 * self.max_rel_drop:g}% relative "
                f"of eager; without evaluation data top-{self.k} overlap >= {self.min_topk_overlap:g}")


#: the project's bar (the brief's "fidelity first")
FIDELITY_BAR = FidelityBar()
