"""The int8 accuracy guard: which quantized layers must stay float to keep the ranking.

Each candidate layer has a :class:`LayerPlan` (activation qparams, int8
weight). :class:`Emulator` runs the float graph with a chosen set of layers
computed exactly as the rewritten QDQ graph computes them (same
``quantized_decomposed`` ops), so the guard can score any subset without
rewriting the graph (both in :mod:`graphopt.passlib.layer_emulator`).
:func:`guard` scores every layer quantized; if that misses the target, it
ranks layers by the damage each does alone (each layer's pass starting from
the float values at that layer, :meth:`Emulator.each_alone`) and keeps the
fewest worst ones float such that the target holds (for int8-mixed-bf16,
the least damaging kept layers then run bf16 GEMMs while the target holds,
the rest fp32); both found by bisection. :func:`confirm` then scores the
rewritten Program itself on every calibration batch (held out or observed:
the layers were chosen on the held-out few) and moves the next most
damaging layers to fp32 while it misses (int8-mixed-bf16: to bf16 GEMMs first,
to fp32 only once no int8 layer is left). Every score is against the fp32 model's outputs.

The default target is the fidelity bar the bench stars variants by
(:data:`graphopt.fidelity_bar.FIDELITY_BAR`): top-10 overlap with the float outputs
>= 0.99 where the first output ranks more than 10 candidates, else cosine
>= 0.999; scored on held-out batches (calibration batches the observers did
not see), at each of their input shapes (the lowest per-shape mean).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt.fidelity_bar import FIDELITY_BAR, relative_change
from graphopt.metrics import agreement
from graphopt.passlib.layer_emulator import Emulator, LayerPlan

__all__ = ["LayerPlan", "Emulator", "Target", "target_for", "Guarded", "guard", "confirm", "inference"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """What the guard holds: ``metric`` (a graphopt.metrics agreement) >= ``required``."""

    metric: str
    required: float
    note: str = ""  # why the target is not the metric asked for (a top-k overlap that cannot miss)

    def describe(self) -> str:
        return f"{self.metric} >= {self.required:g}"

    def show(self, value: float) -> str:
        """``metric value``, with the digits the metric needs (cosine targets sit near 1)."""
        return f"{self.metric} {value:.{6 if self.metric == 'cosine' else 4}f}"


def _too_few_rows(refs: Sequence[tuple[torch.Tensor, ...]], target: Target) -> list[str]:
    """A note when the held-out top-k slots are too few for even a perfect score to bound the
    overlap on unseen rows at the fidelity bar (rule of three: no miss in n slots bounds the miss
    rate by 3/n at 95%). MiniLM-L6 with 16 held-out titles scored 1.0 there and 0.984 on 32
    fresh ones (7-bit weights, 2026-12-05)."""
    if target.metric != "topk_overlap":
        return []
    rows = sum(int(r[0].reshape(-1, r[0].shape[-1]).shape[0]) for r in refs)
    slots = rows * FIDELITY_BAR.k
    bound = 1.0 - 3.0 / max(slots, 1)
    if bound >= FIDELITY_BAR.min_topk_overlap:
        return []
    need = math.ceil(3.0 / (1.0 - FIDELITY_BAR.min_topk_overlap) / FIDELITY_BAR.k)
    return [f"accuracy guard: only {rows} held-out rows ({slots} top-{FIDELITY_BAR.k} slots): even a perfect "
            f"score there bounds the overlap on unseen rows only at >= {bound:.3f} (95%); give more calibration "
            f"batches (>= {need} rows held out for the {FIDELITY_BAR.min_topk_overlap:g} bar)"]


def target_for(metric: str, max_drop: float, reference: Sequence[torch.Tensor], headroom: float = 0.0) -> Target:
    """``metric=bar``: the fidelity bar for these outputs (top-k overlap where the first
    output ranks more than k candidates, else cosine); otherwise ``metric >= 1 - max_drop``.
    ``headroom`` keeps that share of the gap to 1 in hand (0.5: overlap >= 0.995 for a
    0.99 bar), since a few held-out rows estimate the agreement on unseen inputs loosely.
    ``metric=topk_overlap`` on outputs with at most k candidates per row falls back to the bar's
    cosine as ``bar`` does (top-k of k columns is every column: the overlap is 1.0 whatever the
    values, and a calibration that kept cosine 0.59 passed it), with a note saying so."""
    note = ""
    if metric == "bar":
        name, required = FIDELITY_BAR.agreement_target(reference)
    elif metric == "topk_overlap" and FIDELITY_BAR.agreement_target(reference)[0] == "cosine":
        name, required = FIDELITY_BAR.agreement_target(reference)
        width = reference[0].shape[-1] if reference and reference[0].dim() else 1
        note = (f"accuracy guard: metric=topk_overlap cannot miss on an output of {width} column(s) (<= "
                f"top-{FIDELITY_BAR.k}), so the guard holds cosine >= {required:g} as metric=bar does; "
                "use metric=cosine or metric=bar to choose this yourself")
    else:
        name, required = metric, 1.0 - max_drop
    return Target(name, required + headroom * (1.0 - required), note)


@dataclass
class Guarded:
    """What :func:`guard` decided: the layers to quantize, each layer's score when quantized
    alone (only when some must stay float), report notes, the target and the score it held."""

    enabled: set[str]
    alone: dict[str, float]
    notes: list[str]
    target: Target
    score: float
    worst_first: list[str] = field(default_factory=list)  # layers by the damage each does alone, when ranked
    bf16: set[str] = field(default_factory=set)  # kept layers that run bf16 GEMMs (int8-mixed-bf16); others fp32


def _score(target: Target, outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    if target.metric == "cosine":  # the bar's cosine fallback: the worst output, as the bench reports it
        return min(agreement("cosine", (o,), (r,)) for o, r in zip(outputs, reference) if r.is_floating_point())
    return agreement(target.metric, outputs, reference, FIDELITY_BAR.k)


def guard(
    gm: torch.fx.GraphModule,
    plans: dict[str, LayerPlan],
    holdout: Sequence[tuple[torch.Tensor, ...]],
    target_of: Callable[[Sequence[torch.Tensor]], Target],
    where: str,
    validation: Callable[[Callable[..., Any]], Mapping[str, float]] | None = None,
    validation_reference: Mapping[str, float] | None = None,
) -> Guarded:
    """Which layers to quantize (see :class:`Guarded`). ``target_of(reference outputs)``
    picks the target from the float outputs of the first held-out batch.

    When every layer int8 misses the target, layers are ranked by the damage each
    does alone (its score, then the relative squared error of the first output:
    top-k overlap on a few rows ties often), and the fewest worst layers kept
    float such that the target holds is found by bisection (the score is taken
    to rise as more layers stay float), then checked. With int8-mixed-bf16 plans
    the most kept layers, least damaging first, that can run bf16 GEMMs with the
    target held are found the same way; the others run fp32. Every score is
    against the fp32 model. ``validation`` (the user's
    metrics as a function of a model callable): a set of int8 layers must also
    keep every metric within the fidelity bar of the float model's
    (graphopt.fidelity_bar.FIDELITY_BAR, 0.5% relative), checked on the sets the
    held-out score accepts (``validation_reference``: the float model's metrics, when
    the caller has them).
    """
    emu = Emulator(gm, plans)
    refs = [_tuple(emu.run(set(), *b)) for b in holdout]
    target = target_of(refs[0])

    def run(enabled: set[str], bf16: Set[str] = frozenset()) -> tuple[float, float]:
        return _damage(emu, enabled, holdout, refs, target, bf16)

    def holds(value: float) -> bool:
        return value >= target.required - 1e-12

    checked: dict[tuple[frozenset[str], frozenset[str]], tuple[bool, str]] = {}
    reference = validation_reference
    if validation is not None and reference is None:
        reference = dict(validation(lambda *x: emu.run(set(), *x)))
    if validation is not None:  # a metric the float model scores 0 on holds nothing: the top-k target judges
        reference = FIDELITY_BAR.judgeable(reference)
        validation = validation if reference else None

    def valid(enabled: set[str], bf16: Set[str] = frozenset()) -> bool:
        """The validation bar (True without validation data); results kept for the notes."""
        if validation is None or not (enabled or bf16):
            return True
        key = (frozenset(enabled), frozenset(bf16))
        if key not in checked:
            metrics = dict(validation(lambda *x: emu.run(enabled, *x, bf16=bf16)))
            ok, why = FIDELITY_BAR.check(metrics, reference)
            changes = ", ".join(f"{k} {relative_change(metrics[k], v, k):+.2f}%" for k, v in (reference or {}).items()
                                if isinstance(v, (int, float)) and k in metrics)
            checked[key] = (ok, why or changes)
        return checked[key][0]

    full, _ = run(set(plans))
    notes = [f"accuracy guard: {target.show(full)} with every layer int8 on {where} batches "
             f"(target {target.describe()})"] + ([target.note] if target.note else []) + _too_few_rows(refs, target)
    if holds(full) and valid(set(plans)):
        notes += _validation_notes(checked, set(plans))
        return Guarded(set(plans), {}, notes, target, full)
    # every held-out row: ranked on the first 8 or 16 rows of each batch (4x / 2x cheaper), bert4rec:base's
    # guard kept 10 of 18 layers float where it keeps 6 (2026-12-05)
    damage = _damage_alone(emu, list(plans), holdout, refs, target)
    order = _worst_first(damage)

    def without(k: int) -> set[str]:
        return set(order[k:])

    lo, hi = 0, len(order)  # every layer int8 misses; every layer float holds (score 1)
    scores = {0: full}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        scores[mid] = run(without(mid))[0]
        lo, hi = (lo, mid) if holds(scores[mid]) and valid(without(mid)) else (mid, hi)
    enabled = without(hi)
    current = scores.get(hi, 1.0)
    log.info("accuracy guard: %d layer(s) stay float, %s %.4f", hi, target.metric, current)
    notes.append(f"accuracy guard: the {hi} most damaging layer(s) stay float, now {target.show(current)} "
                 f"({len(plans) - hi} of {len(plans)} int8)")
    bf16: set[str] = set()
    if any(plan.bf16_out for plan in plans.values()):
        # the most kept layers, least damaging first, that run bf16 GEMMs with the target held: by
        # bisection as above (one layer at a time took a held-out pass per kept layer, 50 on a
        # BERT-base-sized model)
        kept = list(reversed(order[:hi]))
        bf16_scores = {0: current}
        few, many = 0, len(kept)  # the most that hold lies in [few, many]
        mid = many  # all of them first
        while few < many:
            bf16_scores[mid] = run(enabled, set(kept[:mid]))[0]
            few, many = (mid, many) if holds(bf16_scores[mid]) and valid(enabled, set(kept[:mid])) else (few, mid - 1)
            mid = (few + many + 1) // 2
        bf16, current = set(kept[:few]), bf16_scores[few]
        notes.append(f"accuracy guard: of the layers kept out of int8, {len(bf16)} run bf16 GEMMs and "
                     f"{hi - len(bf16)} fp32 (the least damaging in bf16 while the target holds), "
                     f"now {target.show(current)}")
    notes += _validation_notes(checked, enabled, bf16)
    return Guarded(enabled, {name: d[0] for name, d in damage.items()}, notes, target, current, order, bf16)


def _worst_first(damage: Mapping[str, tuple[float, float]]) -> list[str]:
    """Layers by the damage each does alone: lowest score, then largest squared error."""
    return sorted(damage, key=lambda n: (damage[n][0], -damage[n][1]))


def confirm(
    guarded: Guarded,
    gm: torch.fx.GraphModule,
    plans: dict[str, LayerPlan],
    batches: Sequence[tuple[torch.Tensor, ...]],
    rewritten: Callable[[set[str], Set[str]], Callable[..., Any]],
    validation: Callable[[Callable[..., Any]], Mapping[str, float]] | None = None,
    validation_reference: Mapping[str, float] | None = None,
    where: str = "held-out",
    bf16_attention: bool = False,
    bf16_first: bool = False,
) -> Guarded:
    """Hold the guard's target on the rewritten Program itself, on ``batches``.

    Two reasons to look again. The emulator computes each layer as the rewritten
    graph does but leaves what lies between them in fp32, where int8-mixed-bf16
    also runs attention in bf16 (``bf16_attention``). And the guard chose its layers
    (and ``calibration=auto`` its method) by their score on a few held-out rows,
    which then overstates the score on unseen ones (a winner's curse: MiniLM-L6,
    16 held-out titles 1.0, 32 fresh ones 0.984); the caller passes every
    calibration batch (``where`` says which): the observed ones set the activation
    ranges but took no part in choosing the layers.
    ``rewritten(enabled, bf16)`` builds the Program with the ``enabled`` layers int8
    and the ``bf16`` ones bf16 GEMMs, as a callable; while it misses the target
    (or the validation bar), the most damaging layer not yet fp32 goes fp32, one
    at a time. ``bf16_first`` (int8-mixed-bf16) makes that a ladder: while it misses,
    the most damaging int8 layer goes to a bf16 GEMM, and only once no int8 layer is
    left do the bf16 ones go fp32, most damaging first (a bf16 GEMM rounds ~2**-9 of a
    value where int8 rounds ~2**-8 of the tensor's range, and on a CPU with AMX runs
    several times faster than fp32: bert4rec:base at batch 32 on an Emerald Rapids Xeon,
    2026-12-06, confirmation straight to fp32 left int8-mixed-bf16 at 2.96x eager, below
    the bf16 cast's 4.37x). Returns the guard's decision updated, with a note of what it found.
    """
    target = guarded.target
    refs = [_tuple(inference(gm)(*b)) for b in batches]
    reference = validation_reference
    if validation is not None and reference is None:
        reference = dict(validation(inference(gm)))
    if validation is not None:  # as in guard_layers: nothing to hold where the float model scores 0
        reference = FIDELITY_BAR.judgeable(reference)
        validation = validation if reference else None

    def check(enabled: set[str], bf16: set[str]) -> tuple[float, bool]:
        fn = rewritten(enabled, bf16)
        value = _worst_shape(batches, [_score(target, _tuple(fn(*b)), r) for b, r in zip(batches, refs)])
        ok = value >= target.required - 1e-12
        if ok and validation is not None and (enabled or bf16):
            ok = FIDELITY_BAR.check(dict(validation(fn)), reference)[0]
        return value, ok

    enabled, bf16 = set(guarded.enabled), set(guarded.bf16)
    value, ok = check(enabled, bf16)
    first = value
    order = guarded.worst_first
    if not ok and not order:  # every layer held in the emulator: rank them now
        emu = Emulator(gm, plans)
        order = _worst_first(_damage_alone(emu, list(plans), batches, refs, target))
    moved = False
    for lands in ("bf16", "fp32") if bf16_first else ("fp32",):  # bf16_first: every int8 layer to bf16 first
        for name in order:
            if ok:
                break
            if name in enabled or (lands == "fp32" and name in bf16):
                enabled.discard(name)
                bf16.discard(name)
                if lands == "bf16":
                    bf16.add(name)
                moved = True
                value, ok = check(enabled, bf16)
    notes = list(guarded.notes)
    if moved:
        also = " (it also runs attention in bf16)" if bf16_attention else ""
        to_fp32 = (guarded.enabled | guarded.bf16) - (enabled | bf16)
        moves = [f"{len(names)} more layer(s) run {kind}" for names, kind in ((bf16 - guarded.bf16, "bf16"),
                                                                              (to_fp32, "fp32")) if names]
        notes.append(f"accuracy guard: the rewritten Program scored {target.show(first)} on {where} "
                     f"batches{also}; {', '.join(moves)}, now {target.show(value)} "
                     f"({len(enabled)} of {len(plans)} int8, {len(bf16)} bf16)")
    else:
        notes.append(f"accuracy guard: the rewritten Program holds it on {where} batches too, {target.show(value)}")
    return Guarded(enabled, guarded.alone, notes, target, value, order, bf16)


def _damage(emu: Emulator, enabled: set[str], holdout: Sequence[tuple[torch.Tensor, ...]],
            refs: Sequence[tuple[torch.Tensor, ...]], target: Target,
            bf16: Set[str] = frozenset()) -> tuple[float, float]:
    """Held-out score (:func:`_worst_shape`) and mean relative squared error of the first output, for
    these layer modes."""
    measured = [_measure(target, _tuple(emu.run(enabled, *b, bf16=bf16)), r) for b, r in zip(holdout, refs)]
    return _summary(holdout, measured)


def _damage_alone(emu: Emulator, names: Sequence[str], holdout: Sequence[tuple[torch.Tensor, ...]],
                  refs: Sequence[tuple[torch.Tensor, ...]], target: Target) -> dict[str, tuple[float, float]]:
    """``{name: _damage(emu, {name}, ...)}`` for every name, the same values, with each batch's
    float prefix shared between the layers (:meth:`Emulator.each_alone`)."""
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for b, r in zip(holdout, refs):
        for name, out in emu.each_alone(names, *b):
            measured[name].append(_measure(target, _tuple(out), r))
    return {name: _summary(holdout, measured[name]) for name in names}


def _measure(target: Target, out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """One batch's score and relative squared error of the first output."""
    want = ref[0].detach().double()
    error = float((out[0].detach().double() - want).pow(2).sum() / want.pow(2).sum().clamp_min(1e-30))
    return _score(target, out, ref), error


def _summary(holdout: Sequence[tuple[torch.Tensor, ...]], measured: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The batches' (score, error) pairs as one: the worst per-shape mean score, the mean error."""
    return _worst_shape(holdout, [m[0] for m in measured]), sum(m[1] for m in measured) / len(measured)


def _worst_shape(holdout: Sequence[tuple[torch.Tensor, ...]], values: Sequence[float]) -> float:
    """The lowest of the mean scores per input shape: held-out batches of several sequence lengths (the
    bench's) must each hold the target, as the bench judges each shape on its own; an average lets a
    length that holds it comfortably cover one that does not."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    for batch, value in zip(holdout, values):
        key = tuple(tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else None for t in batch)
        groups.setdefault(key, []).append(value)
    return min(sum(v) / len(v) for v in groups.values())


def inference(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a callable that runs without autograd (a graph module, a rewritten Program)."""
    def run(*inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return fn(*inputs)
    return run


def _validation_notes(checked: Mapping[tuple[frozenset[str], frozenset[str]], tuple[bool, str]], enabled: set[str],
                      bf16: Set[str] = frozenset()) -> list[str]:
    if not checked:
        return []
    missed = sum(not ok for ok, _ in checked.values())
    result = checked.get((frozenset(enabled), frozenset(bf16)))
    now = f"; the chosen set: {result[1]}" if result else ""
    return [f"accuracy guard: validation data checked {len(checked)} set(s) of int8 layers, {missed} missed the "
            f"bar{now}"]


def _tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
