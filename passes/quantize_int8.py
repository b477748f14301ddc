"""quantize-int8: static int8 quantization of linears from calibration data, in QDQ form."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence, Set
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx

from graphopt.errors import PassOptionError
from graphopt.hardware import has_bf16_kernels
from graphopt.ir.fx import drop_unused_attrs, fetch_attr, skip_note
from graphopt.passlib.accuracy_guard import Guarded, LayerPlan, confirm, guard, inference, target_for
from graphopt.passlib.calibration import METHODS, METRICS, constant_notes, observe, read_as
from graphopt.passlib.costs import node_flops
from graphopt.passlib.int8_mixed import carry_bf16
from graphopt.passlib.linear_forms import as_linears
from graphopt.passlib.qdq import (
    REDUCE_RANGE_CHOICES,
    activation_qparams,
    find_linears,
    insert_activation_qdq,
    insert_weight_dequant,
    quantize_weight,
    weight_bits,
)
from graphopt.transform.base import Option, Pass, PassResult, register_pass

__all__ = ["QuantizeInt8"]

log = logging.getLogger(__name__)

_ACT_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}
#: the guard's default: the bench's fidelity bar (graphopt.fidelity_bar.FIDELITY_BAR)
GUARD_METRICS = ("bar", *METRICS)
#: what calibration=auto compares, on one histogram per activation
AUTO_METHODS = ("minmax", "entropy", "mse", "percentile")
#: float GEMM work (share of the linears' FLOPs) within which auto prefers the best held-out score
AUTO_FLOPS_SLACK = 0.02


@register_pass
class QuantizeInt8(Pass):
    """Quantize linears to int8 (static, calibrated) in the PT2E QDQ form Inductor's x86 int8 lowering matches.

    Matches: every GEMM with a constant 2-D fp32 weight: ``aten.linear``, and
    ``_addmm_activation`` (fuse-linear-act), ``addmm`` (GPT-2's Conv1D), ``mm``
    / ``matmul`` by a constant, which are first rewritten exactly into ``linear``
    (+ relu/gelu) by graphopt.passlib.linear_forms. Matmuls of two computed
    tensors (attention scores) and ``skip`` matches stay float, with the reason
    in the report. Runs observers (``calibration`` = minmax|percentile|entropy|mse,
    see graphopt.passlib.calibration) over ``calibration_data`` on each linear's input.
    ``calibration=auto`` (the default) observes one histogram per activation, reads it
    with each of minmax, entropy, mse and percentile, runs the accuracy guard on each,
    and keeps the method whose guarded Program leaves the least GEMM work float (within
    2% of the linears' FLOPs, the one scoring highest held out); the report names the
    choice and what each method kept. The best method differs by model (measured,
    int8-mixed-bf16 at batch 32: bert-cls:base keeps 10 of 19 linears float with minmax,
    2 with entropy or mse; bert4rec:base keeps fewer with minmax than with mse).
    With the guard off, auto is minmax.
    Produces: per-channel symmetric int8 weight constants + ``dequantize_per_channel``
    (per tensor with ``per_channel=false``; 7-bit values with ``reduce_range``,
    which ``auto`` turns on where this CPU's int8 kernels would saturate, see
    graphopt.hardware), and one per-tensor ``quantize_per_tensor`` ->
    ``dequantize_per_tensor`` pair per activation (uint8 asymmetric by default;
    shared by the linears that read it). Inductor with freezing prepacks the
    weights and rewrites ``q -> dq -> linear [-> relu/gelu] [-> q]`` into one
    ``onednn.qlinear_pointwise`` (a following ``q``, e.g. the next linear's
    input after gelu, becomes its uint8 output; a residual add its ``sum``
    post-op), so int8 is carried from one GEMM to the next where a q follows.
    ``mixed=bf16`` (int8-mixed-bf16, the form PT2E gives under bf16 autocast):
    quantized linears read bf16 dequantized operands and write bf16, carried
    through views, relu/gelu and attention (graphopt.passlib.int8_mixed); layer
    norms and residual adds stay fp32. Of the layers the guard keeps out of int8,
    those it finds can run bf16 GEMMs do (least damaging first), the rest fp32
    (a scoring head in bf16 loses ranking: bert-cls:base's did); ``skip`` matches
    stay fp32. Layers are chosen by fidelity, not speed: moving bert-cls:base's
    attention GEMMs (where int8 runs no faster than bf16 at width 256) to bf16
    left it as fast (8.84 vs 8.79 ms at batch 32, top-10 0.996 vs 0.995, AMX Xeon). Then the rewritten
    Program itself must hold the target on every calibration batch (with ``mixed=bf16``
    it runs attention in bf16, which the guard's emulator does not; and the layers
    were chosen on the held-out few, whose score overstates the unseen one): while it
    misses, the most damaging layer left goes fp32 (with ``mixed=bf16``, to a bf16 GEMM
    first, and fp32 only once no int8 layer is left). If every layer ends up fp32, the Program stays fp32.
    Accuracy guard (on by default): on held-out calibration batches (the last
    quarter, which the observers do not see) the Program must keep ``metric``;
    ``bar`` = the bench's fidelity bar (graphopt.fidelity_bar.FIDELITY_BAR: top-10
    overlap with the float outputs >= 0.99 where the first output ranks more
    than 10 candidates, else cosine >= 0.999); another metric must drop at most
    ``max_drop`` (0 turns the guard off). ``headroom`` (0.5) of the gap to 1 is
    kept in hand (top-10 >= 0.995 held out), since a few held-out rows estimate
    the agreement on unseen inputs loosely (measured on bert4rec:base: 0.981 to
    0.991 across 32-row batches at one setting). When it misses, the fewest
    layers doing most damage alone stay float (graphopt.passlib.accuracy_guard).
    With validation data (``graphopt.optimize(..., validation=...)``: the user's
    HR@10/NDCG@10 or AUC/logloss as a function of a model), the chosen layers must
    also keep each of those within 0.5% relative of the float model's on it.
    ``details`` lists every layer with its ranges, score alone and whether it
    stayed float; ``declined`` names the ones kept float and why.
    Requires calibration_data, shapes; preserves shapes. Approximate: tolerance
    0.25 (atol = rtol) on outputs, from the max error measured on the zoo's
    tiny and base models (see tests/passes/test_quantize_int8.py); 1.0 with
    ``calibration=entropy``, which clips the long tails of DLRM's Zipf-skewed
    bag sums by design (measured max |err| / (1 + |ref|) with the guard on:
    0.44 dlrm:tiny, 0.52 dlrm:base, 0.24 two-tower:tiny; the other methods
    0.13 at most); 0.5 with 7-bit weights (``reduce_range``), whose rounding step
    is twice as coarse (0.43 measured on the T5 decoder step of
    tests/passes/test_quantize_int8_models.py, AMD EPYC with AVX2 and no VNNI).
    Before/after: ``linear(x, w, b)`` ->
    ``linear(dq(q(x, s, z)), dequantize_per_channel(w_int8, ws, 0, 0), b)``.
    """

    name = "quantize-int8"
    options = (
        Option("calibration", str, "auto", "how to pick activation ranges; auto: each of "
               f"{', '.join(AUTO_METHODS)} under the accuracy guard, keeping the one that leaves the least "
               "work float (minmax with the guard off)", choices=("auto", *METHODS)),
        Option("percentile", float, 99.99, "percentile of |x| kept (calibration=percentile)",
               check=lambda v: None if 50.0 < v <= 100.0 else "must be in (50, 100]"),
        Option("bins", int, 2048, "histogram bins (entropy needs >= 2048)",
               check=lambda v: None if v >= 128 else "must be >= 128"),
        Option("per_channel", bool, True, "one weight scale per output row"),
        Option("symmetric_weights", bool, True, "zero-point-free int8 weights"),
        Option("activations", str, "uint8", "activation dtype (uint8 runs faster on ORT CPU)",
               choices=tuple(_ACT_DTYPES)),
        Option("reduce_range", str, "auto", "7-bit weights, for CPUs without a VNNI/AMX int8 dot product "
               "(auto: when this CPU has none)", choices=REDUCE_RANGE_CHOICES),
        Option("skip", list, (), "fnmatch patterns of module paths / node names to keep float (fp32, "
               "with mixed=bf16 too)"),
        Option("mixed", str, "none", "int8-mixed-bf16: quantized linears write bf16, carried into attention "
               "(layers the accuracy guard keeps out of int8 run bf16 GEMMs where that holds its target, else "
               "fp32; skip matches, layer norms and residuals stay fp32)", choices=("none", "bf16")),
        Option("metric", str, "bar", "accuracy-guard metric; bar = the bench's fidelity bar "
               "(top-10 overlap >= 0.99, else cosine >= 0.999)", choices=GUARD_METRICS),
        Option("max_drop", float, 0.01, "largest allowed drop of metric vs float on held-out batches "
               "(metric=bar sets its own); 0 turns the guard off",
               check=lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)"),
        Option("headroom", float, 0.5, "share of the gap between the guard's target and 1 kept in hand "
               "on held-out batches, so the target still holds on unseen inputs (0.5: top-10 >= 0.995)",
               check=lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)"),
    )
    requires = frozenset({"calibration_data", "shapes"})
    preserves = frozenset({"shapes"})
    exact = False
    tolerance = 0.25
    backend_notes = (
        "QDQ form: Inductor (freezing, grad off) lowers it to oneDNN qlinear_pointwise with fused "
        "activation/requantization/residual-add; ONNX Runtime runs it as MatMulIntegerToFloat (export "
        "with graphopt.runtimes.onnx_export.qdq_translations and disable ORT's MatMulAddFusion for rank-2 "
        "linears); TensorRT needs activations=int8 (symmetric, zero point 0)."
    )

    def validate(self) -> None:
        if self.calibration == "entropy":
            self.tolerance = 1.0
        if self.calibration == "entropy" and self.bins < 2048:
            raise PassOptionError(f"pass '{self.name}': calibration=entropy needs bins >= 2048, got {self.bins}")

    @property
    def guarded(self) -> bool:
        return self.max_drop > 0

    def _methods(self) -> tuple[str, ...]:
        if self.calibration != "auto":
            return (self.calibration,)
        return AUTO_METHODS if self.guarded else ("minmax",)

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm = program.gm
        before = _graph_copy(gm)  # restored when no layer ends up int8 (see below)
        unmatched = skip_note(gm, self.skip)  # before as_linears renames the GEMMs it rewrites
        rewritten, declined = as_linears(gm, self.skip)
        layers, found_declined = find_linears(gm, self.skip)
        declined += found_declined
        if not layers:
            _restore(gm, before, rewritten)
            return PassResult(program, modified=False, declined=declined, notes=unmatched)
        batches = ctx.calibration_batches()
        calib, holdout = batches, batches
        if self.guarded and len(batches) >= 2:
            cut = max(1, len(batches) // 4)
            calib, holdout = batches[:-cut], batches[-cut:]
        acts = sorted({layer.act.name for layer in layers})
        act_dtype = _ACT_DTYPES[self.activations]
        bits, bits_note = weight_bits(self.reduce_range)
        weights = {layer.node.name: quantize_weight(fetch_attr(gm, layer.weight), per_channel=self.per_channel,
                                                    symmetric=self.symmetric_weights, bits=bits)
                   for layer in layers}
        methods = self._methods()
        shared = len(methods) > 1
        observers = observe(gm, calib, acts, "histogram" if shared else methods[0], percentile=self.percentile,
                            bins=max(self.bins, 2048) if shared else self.bins)
        where = "held-out" if len(holdout) < len(batches) else "calibration (too few batches to hold any out)"
        validation = ctx.validation if self.guarded else None
        float_metrics = dict(validation(inference(gm))) if validation is not None else None
        tried: list[_Tried] = []
        for method in methods:
            ranges = {a: (read_as(o, method, percentile=self.percentile) if shared else o).range()  # type: ignore[arg-type]
                      for a, o in observers.items()}
            plans = {layer.node.name: LayerPlan(layer, activation_qparams(*ranges[layer.act.name], act_dtype),
                                                ranges[layer.act.name], weights[layer.node.name], act_dtype,
                                                self.per_channel, self.mixed == "bf16")
                     for layer in layers}
            guarded = guard(gm, plans, holdout, lambda ref: target_for(self.metric, self.max_drop, ref,
                                                                       self.headroom), where, validation,
                            float_metrics) if self.guarded else None
            tried.append(_Tried(method, plans, guarded))
        best = _pick(tried)
        plans, guarded = best.plans, best.guarded
        guard_chose = set(guarded.enabled) if guarded is not None else set(plans)  # before confirm moves any
        if guarded is not None and (self.mixed == "bf16" or len(holdout) < len(batches)):
            # the rewritten Program on every calibration batch: the guard's choice was made on the
            # held-out few (accuracy_guard.confirm)
            guarded = confirm(guarded, gm, plans, batches, functools.partial(_rewritten_copy, gm, plans),
                              validation, float_metrics, where=f"all {len(batches)} calibration",
                              bf16_attention=self.mixed == "bf16", bf16_first=self.mixed == "bf16")
        # 7-bit weights round twice as coarsely: twice the tolerance
        self.tolerance = 1.0 if best.method == "entropy" else type(self).tolerance * 2 ** (8 - bits)
        enabled = guarded.enabled if guarded else set(plans)
        # int8-mixed-bf16: the kept layers the guard found can run bf16 GEMMs (the others run fp32)
        bf16 = guarded.bf16 if guarded else set()
        alone = guarded.alone if guarded else {}
        notes: list[str] = ([bits_note] if bits_note else []) + unmatched
        if self.mixed == "bf16" and not has_bf16_kernels():
            notes.append("mixed=bf16: oneDNN has no bf16 kernels for this CPU (AVX2 only), so int8-mixed-bf16 "
                         "GEMMs run its reference code (bert4rec:base at batch 32: 0.05x eager on Inductor, where "
                         "mixed=none gave 2.18x); use mixed=none on this CPU")
        if rewritten:
            notes.append("as linear: " + ", ".join(f"{k} {v}" for k, v in sorted(rewritten.items())))
        if shared:
            notes.append(_auto_note(tried, best))
        notes += constant_notes(observers) + (guarded.notes if guarded else [])
        metric = guarded.target.metric if guarded else self.metric
        details = []
        for name, plan in plans.items():
            detail: dict[str, Any] = {
                "layer": plan.layer.label, "node": name, "act_range": [round(v, 6) for v in plan.act_range],
                "act_scale": plan.qparams[0], "act_zero_point": plan.qparams[1],
                "weight_scale_max": float(plan.weight[1].max()), "weight_bits": bits, "quantized": name in enabled,
            }
            if name not in enabled:
                detail["kept_as"] = "bf16" if name in bf16 else "fp32"
            if name in alone:
                detail["sensitivity"] = round(1.0 - alone[name], 6)
            if name not in enabled:
                if name in guard_chose:  # the guard chose it int8; the rewritten Program's check moved it
                    why = (f"the rewritten Program missed the target on all {len(batches)} calibration batches "
                           "with it int8")
                elif name in alone:
                    why = f"among the layers doing most damage alone ({metric} {alone[name]:.4f} with only it int8)"
                else:
                    why = "the rewritten Program missed the target with it int8"
                why += f"; runs {detail['kept_as']}" if self.mixed == "bf16" else ""
                detail["reason"] = f"accuracy guard: {why}"
                declined.append(f"{name} ({plan.layer.label}): kept float by the accuracy guard, {why}")
            details.append(detail)
        if not enabled and not bf16:
            # nothing quantized: the Program stays as it came (O2's fused linear+gelu too, which
            # as_linears split for int8), so the pass reports no change and a bench sees the Program
            # of the pipeline without it (graphopt.bench.variants does not time it twice)
            if rewritten:
                _restore(gm, before, rewritten)
                notes = [n for n in notes if not n.startswith("as linear: ")]
            notes.append(f"no layer int8 (all {len(plans)} kept float): the Program is left as it came")
            return PassResult(program, modified=False, stats={"kept-float": len(plans)}, declined=declined,
                              details=details, notes=notes)
        stats = _apply(gm, plans, enabled, bf16)
        chosen = [n for n in plans if n in enabled]
        stats.update({"linear": len(chosen), "activation-qdq": len({plans[n].layer.act.name for n in chosen}),
                      **_prefixed(rewritten)})
        if len(chosen) < len(plans):
            stats["kept-float"] = len(plans) - len(chosen)
        return PassResult(program, modified=bool(chosen) or bool(rewritten), stats=stats, declined=declined,
                          details=details, notes=notes)


def _graph_copy(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    return copy.deepcopy(gm.graph)  # nodes and their meta (shallow), not the weights


def _restore(gm: torch.fx.GraphModule, graph: torch.fx.Graph, rewritten: dict[str, int]) -> None:
    """Put back the graph ``as_linears`` rewrote (and drop the transposed weights it added)."""
    if not rewritten:
        return
    gm.graph = graph
    drop_unused_attrs(gm)
    gm.recompile()


def _apply(gm: torch.fx.GraphModule, plans: dict[str, LayerPlan], enabled: Set[str],
           bf16: Set[str] = frozenset()) -> dict[str, int]:
    """Rewrite the ``enabled`` layers of ``gm`` into QDQ form (and, for int8-mixed-bf16 plans,
    the int8-mixed-bf16 form, with the ``bf16`` layers as bf16 GEMMs); returns carry_bf16's counts."""
    chosen = [plans[n] for n in plans if n in enabled]
    by_act: dict[torch.fx.Node, list[LayerPlan]] = {}
    for plan in chosen:
        insert_weight_dequant(gm, plan.layer, *plan.weight, per_channel=plan.per_channel)
        by_act.setdefault(plan.layer.act, []).append(plan)
    for act, group in by_act.items():
        # consumers of one tensor share a QDQ pair when their ranges agree (they do: one observer)
        insert_activation_qdq(gm, act, [p.layer.node for p in group], group[0].qparams, group[0].act_dtype)
    kept = [plans[n].layer.node for n in plans if n not in enabled and n in bf16]
    if not any(p.bf16_out for p in plans.values()) or not (chosen or kept):
        return {}
    return carry_bf16(gm, [p.layer.node for p in chosen], kept)


def _rewritten_copy(gm: torch.fx.GraphModule, plans: dict[str, LayerPlan], enabled: Set[str],
                    bf16: Set[str]) -> Any:
    """The Program ``_apply`` would make, built on a copy of the graph (sharing the
    weights) and returned as a callable; ``gm`` is left as it is."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    copy = torch.fx.GraphModule(gm, graph)
    moved = {name: replace(plan, layer=replace(plan.layer, node=env[plan.layer.node], act=env[plan.layer.act]))
             for name, plan in plans.items()}
    _apply(copy, moved, enabled, bf16)
    copy.recompile()
    return inference(copy)


@dataclass
class _Tried:
    """One calibration method's plans and what the guard kept of them."""

    method: str
    plans: dict[str, LayerPlan]
    guarded: Guarded | None

    @functools.cached_property
    def float_flops(self) -> int:
        enabled = self.guarded.enabled if self.guarded else set(self.plans)
        return sum(node_flops(p.layer.node) for n, p in self.plans.items() if n not in enabled)

    @functools.cached_property
    def total_flops(self) -> int:
        return max(1, sum(node_flops(p.layer.node) for p in self.plans.values()))

    @property
    def score(self) -> float:
        return self.guarded.score if self.guarded else 0.0


def _pick(tried: Sequence[_Tried]) -> _Tried:
    """The method whose guarded Program keeps the least GEMM work in float; within
    ``AUTO_FLOPS_SLACK`` of the linears' FLOPs of that, the one scoring highest held out
    (picking the fewest float layers alone would favour a method that scored well by
    chance on the few held-out rows); then the order of ``AUTO_METHODS``."""
    least = min(t.float_flops for t in tried)
    close = [t for t in tried if t.float_flops <= least + AUTO_FLOPS_SLACK * tried[0].total_flops]
    return max(close, key=lambda t: t.score)  # max keeps the first of equals


def _auto_note(tried: Sequence[_Tried], best: _Tried) -> str:
    parts = [f"{t.method}: {100.0 * t.float_flops / t.total_flops:.1f}% of the GEMM FLOPs float"
             + (f", {t.guarded.target.metric} {t.score:.4f}" if t.guarded else "") for t in tried]
    return f"calibration=auto chose {best.method} ({'; '.join(parts)})"


def _prefixed(rewritten: dict[str, int]) -> dict[str, int]:
    return {f"as-linear:{k}": v for k, v in rewritten.items()}
