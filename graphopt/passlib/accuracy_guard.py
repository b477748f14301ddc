"""The int8 accuracy guard: which quantized layers must stay float to keep the ranking.

Each candidate layer has a :class:`LayerPlan` (activation qparams, int8
weight). :class:`Emulator` runs the float graph with a chosen set of layers
computed exactly as the rewritten QDQ graph computes them (same
``quantized_decomposed`` ops), so the guard can score any subset without
rewriting the graph. :func:`guard` scores every layer quantized; if that
misses the target, it ranks layers by the damage each does alone and keeps
the worst in float, one at a time, until the target holds.

The default target is the fidelity bar the bench stars variants by
(:data:`graphopt.metrics.FIDELITY_BAR`): top-10 overlap with the float outputs
>= 0.99 where the first output ranks more than 10 candidates, else cosine
>= 0.999; scored on held-out batches (calibration batches the observers did
not see).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from graphopt.metrics import FIDELITY_BAR, agreement, relative_change
from graphopt.passlib.qdq import QD, WEIGHT_QMAX, WEIGHT_QMIN, QuantLinear

__all__ = ["LayerPlan", "Emulator", "Target", "target_for", "Guarded", "guard"]

log = logging.getLogger(__name__)


@dataclass
class LayerPlan:
    """One layer's quantization: activation ``qparams`` = (scale, zp, qmin, qmax),
    the observed range, and the int8 weight ``(q, scale, zero_point)``."""

    layer: QuantLinear
    qparams: tuple[float, int, int, int]
    act_range: tuple[float, float]
    weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    act_dtype: torch.dtype
    per_channel: bool
    bf16_out: bool = False  # int8-mixed-bf16: the GEMM reads bf16 operands and rounds its output to bf16

    def dequantized_weight(self) -> torch.Tensor:
        q, scale, zp = self.weight
        if not self.per_channel:
            return QD.dequantize_per_tensor(q, float(scale), int(zp), WEIGHT_QMIN, WEIGHT_QMAX, torch.int8)
        return QD.dequantize_per_channel(q, scale.float(), zp, 0, WEIGHT_QMIN, WEIGHT_QMAX, torch.int8)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        args = (*self.qparams, self.act_dtype)
        return QD.dequantize_per_tensor(QD.quantize_per_tensor(x, *args), *args)


class _Switched(torch.nn.Module):
    """A linear that computes as the QDQ graph does when ``on``, else in float."""

    def __init__(self, plan: LayerPlan):
        super().__init__()
        self.plan, self.on = plan, False
        self.weight_dq = plan.dequantized_weight()

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.on:
            x, weight = self.plan.fake_quant(x), self.weight_dq
        # int8-mixed-bf16 runs both forms as bf16 GEMMs (an int8 one on bf16 dequantized operands, a layer
        # kept out of int8 on its bf16 weight); attention after them also runs bf16 there, not emulated
        if self.plan.bf16_out:
            low = torch.bfloat16
            bias = bias.to(low) if bias is not None else None
            return torch.nn.functional.linear(x.to(low), weight.to(low), bias).float()
        return torch.nn.functional.linear(x, weight, bias)


class Emulator:
    """The float graph with every planned layer switchable to its QDQ numerics.

    A copy of the graph (sharing the weights) where each planned ``linear`` calls
    a switch module; :meth:`run` sets the switches and runs it as generated
    Python, so scoring a subset of layers costs one forward pass.
    """

    def __init__(self, gm: torch.fx.GraphModule, plans: dict[str, LayerPlan]):
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        graph.output(graph.graph_copy(gm.graph, env))
        self.module = torch.fx.GraphModule(gm, graph)
        self.switches: dict[str, _Switched] = {}
        by_name = {n.name: n for n in gm.graph.nodes}
        for i, (name, plan) in enumerate(plans.items()):
            node = env[by_name[name]]
            switch = _Switched(plan)
            target = f"_graphopt_switch_{i}"
            self.module.add_submodule(target, switch)
            self.switches[name] = switch
            with graph.inserting_before(node):
                call = graph.call_module(target, node.args, node.kwargs)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
        self.module.recompile()

    def run(self, enabled: set[str], *inputs: torch.Tensor) -> Any:
        for name, switch in self.switches.items():
            switch.on = name in enabled
        with torch.no_grad():
            return self.module(*inputs)


@dataclass(frozen=True)
class Target:
    """What the guard holds: ``metric`` (a graphopt.metrics agreement) >= ``required``."""

    metric: str
    required: float

    def describe(self) -> str:
        return f"{self.metric} >= {self.required:g}"


def target_for(metric: str, max_drop: float, reference: Sequence[torch.Tensor], headroom: float = 0.0) -> Target:
    """``metric=bar``: the fidelity bar for these outputs (top-k overlap where the first
    output ranks more than k candidates, else cosine); otherwise ``metric >= 1 - max_drop``.
    ``headroom`` keeps that share of the gap to 1 in hand (0.5: overlap >= 0.995 for a
    0.99 bar), since a few held-out rows estimate the agreement on unseen inputs loosely."""
    if metric == "bar":
        name, required = FIDELITY_BAR.agreement_target(reference)
    else:
        name, required = metric, 1.0 - max_drop
    return Target(name, required + headroom * (1.0 - required))


@dataclass
class Guarded:
    """What :func:`guard` decided: the layers to quantize, each layer's score when quantized
    alone (only when some must stay float), report notes, the target and the score it held."""

    enabled: set[str]
    alone: dict[str, float]
    notes: list[str]
    target: Target
    score: float


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
    to rise as more layers stay float), then checked. ``validation`` (the user's
    metrics as a function of a model callable): a set of int8 layers must also
    keep every metric within the fidelity bar of the float model's
    (graphopt.metrics.FIDELITY_BAR, 0.5% relative), checked on the sets the
    held-out score accepts (``validation_reference``: the float model's metrics, when
    the caller has them).
    """
    emu = Emulator(gm, plans)
    refs = [_tuple(emu.run(set(), *b)) for b in holdout]
    target = target_of(refs[0])

    def run(enabled: set[str]) -> tuple[float, float]:
        values, errors = [], []
        for b, r in zip(holdout, refs):
            out = _tuple(emu.run(enabled, *b))
            values.append(_score(target, out, r))
            ref = r[0].detach().double()
            errors.append(float((out[0].detach().double() - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)))
        return sum(values) / len(values), sum(errors) / len(errors)

    def holds(value: float) -> bool:
        return value >= target.required - 1e-12

    checked: dict[frozenset[str], tuple[bool, str]] = {}
    reference = validation_reference
    if validation is not None and reference is None:
        reference = dict(validation(lambda *x: emu.run(set(), *x)))

    def valid(enabled: set[str]) -> bool:
        """The validation bar (True without validation data); results kept for the notes."""
        if validation is None or not enabled:
            return True
        key = frozenset(enabled)
        if key not in checked:
            metrics = dict(validation(lambda *x: emu.run(enabled, *x)))
            ok, why = FIDELITY_BAR.check(metrics, reference)
            changes = ", ".join(f"{k} {relative_change(metrics[k], v, k):+.2f}%" for k, v in (reference or {}).items()
                                if isinstance(v, (int, float)) and k in metrics)
            checked[key] = (ok, why or changes)
        return checked[key][0]

    full, _ = run(set(plans))
    notes = [f"accuracy guard: {target.metric} {full:.4f} with every layer int8 on {where} batches "
             f"(target {target.describe()})"]
    if holds(full) and valid(set(plans)):
        notes += _validation_notes(checked, set(plans))
        return Guarded(set(plans), {}, notes, target, full)
    damage = {name: run({name}) for name in plans}
    order = sorted(plans, key=lambda n: (damage[n][0], -damage[n][1]))  # worst first

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
    notes.append(f"accuracy guard: the {hi} most damaging layer(s) stay float; {target.metric} now {current:.4f} "
                 f"({len(plans) - hi} of {len(plans)} int8)")
    notes += _validation_notes(checked, enabled)
    return Guarded(enabled, {name: d[0] for name, d in damage.items()}, notes, target, current)


def _validation_notes(checked: Mapping[frozenset[str], tuple[bool, str]], enabled: set[str]) -> list[str]:
    if not checked:
        return []
    missed = sum(not ok for ok, _ in checked.values())
    result = checked.get(frozenset(enabled))
    now = f"; the chosen set: {result[1]}" if result else ""
    return [f"accuracy guard: validation data checked {len(checked)} set(s) of int8 layers, {missed} missed the "
            f"bar{now}"]


def _tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
