"""Fidelity for the tuner: which metric, the bar, and measuring a callable against eager.

A metric is one entry of :data:`METRICS`. ``source="eval"`` metrics read a
key of the evaluator's result on evaluation data (``ndcg@10``, ``hr@10``; a
CTR ``auc`` is one more entry once an evaluator returns it); the bar is
:class:`graphopt.fidelity_bar.FidelityBar`'s rule with ``max_rel_drop`` =
``--max-drop``: *every* quality metric eager reports stays within it, the
named one is the one ranked, plotted and used for sensitivity.
``source="reference"`` metrics compare the first output with eager's on
held-out batches (``topk-overlap``: the bar is overlap >= 1 - max_drop; where
the outputs rank nothing, cosine >= :data:`graphopt.bench.report.MIN_COSINE`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.bench.report import MIN_COSINE
from graphopt.errors import GraphoptError
from graphopt.fidelity_bar import FIDELITY_BAR, FidelityBar, relative_change, shown_against
from graphopt.hits import UserHits, hit_changes
from graphopt.metrics import agreement, score_matrix
from graphopt.tune.data import DataSpecError, TuneData

__all__ = ["Metric", "METRICS", "Judge", "parse_drop"]

Fn = Callable[..., Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Metric:
    """A fidelity metric the tuner can hold candidates to."""

    name: str
    source: str  # "eval": a key of the evaluator's result; "reference": agreement with eager
    key: str
    default_max_drop: float  # a fraction: 0.005 = 0.5%
    help: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("ndcg@10", "eval", "ndcg@10", FIDELITY_BAR.max_rel_drop,
               "NDCG@10 on evaluation data (with HR@10 also held to the bar)"),
        Metric("hr@10", "eval", "hr@10", FIDELITY_BAR.max_rel_drop,
               "HR@10 on evaluation data (with NDCG@10 also held to the bar)"),
        Metric("topk-overlap", "reference", "topk_overlap", 1.0 - FIDELITY_BAR.min_topk_overlap,
               "top-10 overlap with eager's ranking on held-out batches"),
    )
}


#: the largest drop a bare number may give (5%): above it, "0.5" is more likely meant as 0.5% than as 50%
BARE_DROP_MAX = 0.05


def parse_drop(text: str | float) -> float:
    """``"0.5%"`` -> 0.005, ``"0.005"`` -> 0.005; must lie in [0, 1). A bare number above
    :data:`BARE_DROP_MAX` is refused (``0.5`` would be 50%): write it with a ``%`` sign."""
    percent = False
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise DataSpecError(f"--max-drop {text!r}: expected a percentage such as 0.5% or a fraction such as 0.005")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip()
        percent = t.endswith("%")
        try:
            value = float(t[:-1]) / 100.0 if percent else float(t)
        except ValueError:
            raise DataSpecError(f"--max-drop {text!r}: expected a fraction or a percentage such as 0.5%") from None
    if not percent and math.isfinite(value) and 1.0 <= value < 100.0:
        raise DataSpecError(f"--max-drop {text!r}: a bare number is a fraction and must be below 1; write {text}% "
                            f"for {text} percent")
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise DataSpecError(f"--max-drop {text!r}: must be between 0% and 100%")
    if not percent and value > BARE_DROP_MAX:
        raise DataSpecError(f"--max-drop {text!r}: a bare number is a fraction ({text} = {100 * value:g}%); "
                            f"write {text}% for {text} percent, or {100 * value:g}% if you mean that")
    return value


class Judge:
    """Measures a callable's fidelity against eager and says whether it meets the bar."""

    def __init__(self, metric: str, max_drop: float | None, data: TuneData, reference: Fn):
        if metric not in METRICS:
            raise DataSpecError(f"--metric {metric!r}: one of {', '.join(METRICS)}")
        self.metric = METRICS[metric]
        self.max_drop = self.metric.default_max_drop if max_drop is None else float(max_drop)
        self.data = data
        if self.metric.source == "eval" and data.evaluator is None:
            raise DataSpecError(
                f"--metric {metric} needs evaluation data (--data ml-100k); without it use --metric topk-overlap"
            )
        self.bar = FidelityBar(max_rel_drop=self.max_drop, min_topk_overlap=1.0 - self.max_drop)
        self.reference_eval: dict[str, float] = {}
        self.reference_subset: dict[str, float] = {}
        self.reference_outputs: list[tuple[torch.Tensor, ...]] = []
        self._reference = reference
        self._screen_reference: list[torch.Tensor] | None = None
        self._reference_users: dict[bool, UserHits | None] = {False: None, True: None}
        if self.metric.source == "eval":
            self.reference_eval, self._reference_users[False] = _split_users(data.evaluator(reference))  # type: ignore[misc]
            if self.metric.key not in self.reference_eval:
                raise DataSpecError(f"--metric {metric}: the evaluation data reports {', '.join(self.reference_eval)}")
            if data.subset_evaluator is not None:
                self.reference_subset, self._reference_users[True] = _split_users(data.subset_evaluator(reference))
        else:
            self.reference_outputs = [_tuple(reference(*b)) for b in data.screen]
            self._ranks = score_matrix(self.reference_outputs[0][0], FIDELITY_BAR.k) is not None

    def describe(self) -> str:
        if self.metric.source == "eval":
            keys = ", ".join(k.upper() for k in self.reference_eval)
            return f"{keys} within {100 * self.max_drop:g}% relative of eager's ({self.data.description})"
        what = f"top-10 overlap >= {1 - self.max_drop:.4g}" if self._ranks else f"cosine >= {MIN_COSINE}"
        return f"{what} vs eager ({self.data.description})"

    def measure(self, fn: Fn, *, subset: bool = False) -> dict[str, Any]:
        """``{"metric", "value", "reference", "change_pct", "values", "meets", "why"}`` for ``fn``,
        and ``"users"`` (:func:`graphopt.hits.hit_changes` against eager: users gained, lost, the
        closest eager margin among them, McNemar p) when the evaluator reports per-user hits.

        ``subset`` measures on fewer users (sensitivity ranking; the bar is then indicative only).
        """
        if self.metric.source == "eval":
            on_subset = bool(subset and self.data.subset_evaluator and self.reference_subset)
            evaluate = self.data.subset_evaluator if on_subset else self.data.evaluator
            reference = self.reference_subset if on_subset else self.reference_eval
            values, users = _split_users(evaluate(fn))  # type: ignore[misc]
            meets, why = self.bar.check(values, reference)
            key = self.metric.key
            value, ref = values.get(key, math.nan), reference[key]
            change = relative_change(value, ref, key)
            result = {"metric": key, "value": value, "reference": ref, "change_pct": change,
                      "values": values, "reference_values": dict(reference), "meets": meets, "why": why}
            ref_users = self._reference_users[on_subset]
            if users is not None and ref_users is not None and users.hits.shape == ref_users.hits.shape:
                result["users"] = hit_changes(ref_users, users)
            return result
        batches = self.data.screen[:1] if subset else self.data.screen
        scores = []
        kind = "topk_overlap" if self._ranks else "cosine"
        for batch, ref in zip(batches, self.reference_outputs):
            out = _tuple(fn(*batch))
            if len(out) != len(ref) or tuple(out[0].shape) != tuple(ref[0].shape):
                raise GraphoptError(f"outputs {[list(o.shape) for o in out]} do not match eager's {[list(r.shape) for r in ref]}")
            scores.append(agreement(kind, out, ref, FIDELITY_BAR.k))
        value = float(sum(scores) / len(scores))
        if self._ranks:
            meets, why = self.bar.check(None, None, value)
        else:
            meets, why = (value >= MIN_COSINE, "" if value >= MIN_COSINE else f"cosine {shown_against(value, MIN_COSINE, 4)} < {MIN_COSINE}")
        return {"metric": kind, "value": value, "reference": 1.0, "change_pct": 100.0 * (value - 1.0),
                "values": {kind: value}, "meets": meets, "why": why}

    def screen(self, fn: Fn) -> dict[str, Any]:
        """:meth:`measure`, cheaper for clear misses: with evaluation data scored user by user, a
        candidate is rejected on the first users only when what it lost there could not plausibly be
        made up by the users not yet seen (:meth:`_hopeless`); otherwise on all of them."""
        if self.metric.source == "eval" and self.data.subset_evaluator is not None \
                and self.data.subset_evaluator is not self.data.evaluator:
            quick = self.measure(fn, subset=True)
            if self._hopeless(quick):
                quick["meets"] = False
                quick["why"] = (f"{quick['metric']} {quick['change_pct']:+.2f}% vs eager on the first "
                                f"{self._users(True)} users (bar -{100 * self.max_drop:g}% on all "
                                f"{self._users(False)}; more lost there than the rest could make up); "
                                "rejected before the full evaluation")
                quick["subset"] = True
                return quick
        return self.measure(fn)

    #: users' worth the users not yet seen are assumed able to recover beyond the candidate's own gains
    SCREEN_SLACK_USERS = 2.0

    def _users(self, subset: bool) -> int:
        users = self._reference_users[subset]
        return int(users.hits.numel()) if users is not None else 0

    def _hopeless(self, quick: dict[str, Any]) -> bool:
        """Whether a subset measurement cannot hold the bar on all users, in users' worth (a user
        adds at most 1 to HR@10's or NDCG@10's sum): its loss on the ``n`` first users exceeds the
        loss the bar allows on all ``N`` plus what the ``N - n`` others could recover, taken as the
        users it gained on the subset scaled to their number plus :attr:`SCREEN_SLACK_USERS`. A lost
        user on 256 is 3-4% of HR@10 there but a tenth of that on 943, so a few-user loss is never
        rejected here. Without per-user results nothing is rejected on the subset."""
        n, total = self._users(True), self._users(False)
        key = self.metric.key
        change = quick.get("change_pct", math.nan)
        if not (n and total > n and "users" in quick and math.isfinite(change)):
            return False  # the full evaluation decides
        if change >= -400.0 * self.max_drop:  # within 4x the bar: never worth an early verdict
            return False
        lost = (self.reference_subset[key] - quick["value"]) * n
        allowed = self.max_drop * self.reference_eval[key] * total
        recover = quick["users"]["gained"] * (total - n) / n + self.SCREEN_SLACK_USERS
        return lost > allowed + recover

    def score_error(self, fn: Fn) -> float:
        """Mean relative L2 error of ``fn``'s first output vs eager's on the screening batches.

        Continuous where the metric is not: on a few hundred users a hit is a step of
        0.4-1%, so layers tie on the drop; this orders them within a tie."""
        if self._screen_reference is None:  # top-k mode computed them already; with evaluation data, once here
            self._screen_reference = [r[0].float() for r in self.reference_outputs] or \
                [_tuple(self._reference(*b))[0].float() for b in self.data.screen]
        errors = []
        for batch, ref in zip(self.data.screen, self._screen_reference):
            out = _tuple(fn(*batch))[0].float()
            errors.append(float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12)))
        return sum(errors) / len(errors) if errors else 0.0

    def sensitivity_drop(self, fn: Fn) -> float:
        """How much the primary metric falls for ``fn`` (>= 0 worse), on the cheap subset."""
        r = self.measure(fn, subset=True)
        change = r["change_pct"]
        return float(-change / 100.0) if math.isfinite(change) else math.inf


def _split_users(result: dict[str, Any]) -> tuple[dict[str, float], UserHits | None]:
    """An evaluator's metrics as floats, and its ``"per_user"`` hits if it reported them."""
    users = result.get("per_user")
    values = {k: float(v) for k, v in result.items() if k != "per_user"}
    return values, users if isinstance(users, UserHits) else None


def _tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
