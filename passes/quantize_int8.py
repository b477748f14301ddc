"""quantize-int8: static int8 quantization of linears from calibration data, in QDQ form."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from graphopt.errors import PassOptionError
from graphopt.ir.fx import fetch_attr
from graphopt.passlib.calibration import METHODS, METRICS, agreement, observe
from graphopt.passlib.qdq import (
    QD,
    REDUCE_RANGE_CHOICES,
    WEIGHT_QMAX,
    WEIGHT_QMIN,
    QuantLinear,
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


class _Plan:
    """Per-layer quantization decisions: activation qparams and int8 weights."""

    def __init__(self, layer: QuantLinear, qparams: tuple[float, int, int, int], act_range: tuple[float, float],
                 weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor], act_dtype: torch.dtype,
                 per_channel: bool):
        self.layer, self.qparams, self.act_range, self.weight, self.act_dtype = (
            layer, qparams, act_range, weight, act_dtype)
        self.per_channel = per_channel
        q, scale, zp = weight
        if not per_channel:
            self.w_deq = QD.dequantize_per_tensor(q, float(scale), int(zp), WEIGHT_QMIN, WEIGHT_QMAX, torch.int8)
        else:
            self.w_deq = QD.dequantize_per_channel(q, scale.float(), zp, 0, WEIGHT_QMIN, WEIGHT_QMAX, torch.int8)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        args = (*self.qparams, self.act_dtype)
        return QD.dequantize_per_tensor(QD.quantize_per_tensor(x, *args), *args)


class _Emulator(torch.fx.Interpreter):
    """Runs the float graph with the ``enabled`` layers computed exactly as the
    rewritten QDQ graph computes them (same ops), for the accuracy guard."""

    def __init__(self, gm: torch.fx.GraphModule, plans: dict[str, _Plan], enabled: set[str]):
        super().__init__(gm)
        self.plans, self.enabled = plans, enabled

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name not in self.enabled:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        plan = self.plans[n.name]
        bias = args[2] if len(args) > 2 else None
        return torch.ops.aten.linear(plan.fake_quant(args[0]), plan.w_deq, bias)


@register_pass
class QuantizeInt8(Pass):
    """Quantize linears to int8 (static, calibrated) in the PT2E QDQ form.

    Matches: ``aten.linear`` with a constant 2-D fp32 weight (matmuls of two
    computed tensors and ``skip`` matches are declined). Runs observers
    (``calibration`` = minmax|percentile|entropy|mse, see graphopt.calibration)
    over ``calibration_data`` on each linear's input.
    Produces: int8 weight buffers + ``dequantize_per_channel`` (symmetric,
    per output row; per tensor with ``per_channel=false``; 7-bit values with
    ``reduce_range``, which ``auto`` turns on where this CPU's int8 kernels
    would saturate, see graphopt.hardware), and one
    ``quantize_per_tensor``/``dequantize_per_tensor`` pair per activation
    (uint8 asymmetric by default; shared by the linears that read it).
    Accuracy guard: with ``max_drop`` > 0 the ``metric`` (agreement of the
    first output with the float Program, on held-out calibration batches) may
    drop at most ``max_drop``; otherwise the most sensitive layers (drop when
    quantized alone) are left in float one at a time until it holds. ``details``
    lists every layer with its ranges, sensitivity and whether it stayed float.
    Requires calibration_data, shapes; preserves shapes. Approximate: tolerance
    0.25 (atol = rtol) on outputs, from the max error measured on the zoo's
    tiny and base models (see tests/passes/test_quantize_int8.py).
    Before/after: ``linear(x, w, b)`` ->
    ``linear(dq(q(x, s, z)), dequantize_per_channel(w_int8, ws, 0, 0), b)``.
    """

    name = "quantize-int8"
    options = (
        Option("calibration", str, "minmax", "how to pick activation ranges", choices=METHODS),
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
        Option("skip", list, (), "fnmatch patterns of module paths / node names to keep float"),
        Option("max_drop", float, 0.0, "largest allowed metric drop vs float; 0 turns the guard off",
               check=lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)"),
        Option("metric", str, "topk_overlap", "accuracy-guard metric", choices=METRICS),
    )
    requires = frozenset({"calibration_data", "shapes"})
    preserves = frozenset({"shapes"})
    exact = False
    tolerance = 0.25
    backend_notes = (
        "QDQ form: Inductor (freezing) lowers it to oneDNN int8 qlinear; ONNX Runtime runs it as "
        "MatMulIntegerToFloat (export with graphopt.runtimes.onnx_export.qdq_translations and disable ORT's "
        "MatMulAddFusion for rank-2 linears); TensorRT needs activations=int8 (symmetric, zero point 0)."
    )

    def validate(self) -> None:
        if self.calibration == "entropy" and self.bins < 2048:
            raise PassOptionError(f"pass '{self.name}': calibration=entropy needs bins >= 2048, got {self.bins}")

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm = program.gm
        layers, declined = find_linears(gm, self.skip)
        if not layers:
            return PassResult(program, modified=False, declined=declined)
        batches = ctx.calibration_batches()
        calib, holdout = batches, batches
        if self.max_drop > 0 and len(batches) >= 2:
            cut = max(1, len(batches) // 4)
            calib, holdout = batches[:-cut], batches[-cut:]
        acts = sorted({layer.act.name for layer in layers})
        observers = observe(gm, calib, acts, self.calibration, percentile=self.percentile, bins=self.bins)
        act_dtype = _ACT_DTYPES[self.activations]
        bits, bits_note = weight_bits(self.reduce_range)
        plans: dict[str, _Plan] = {}
        for layer in layers:
            lo, hi = observers[layer.act.name].range()
            weight = quantize_weight(fetch_attr(gm, layer.weight), per_channel=self.per_channel,
                                     symmetric=self.symmetric_weights, bits=bits)
            plans[layer.node.name] = _Plan(layer, activation_qparams(lo, hi, act_dtype), (lo, hi), weight, act_dtype,
                                         self.per_channel)
        enabled = set(plans)
        sensitivity: dict[str, float] = {}
        notes: list[str] = [bits_note] if bits_note else []
        if self.max_drop > 0:
            enabled, sensitivity, guard_notes = self._guard(gm, plans, holdout, len(holdout) < len(batches))
            notes += guard_notes
        details = []
        for name, plan in plans.items():
            detail: dict[str, Any] = {
                "layer": plan.layer.label, "node": name, "act_range": [round(v, 6) for v in plan.act_range],
                "act_scale": plan.qparams[0], "act_zero_point": plan.qparams[1],
                "weight_scale_max": float(plan.weight[1].max()), "weight_bits": bits, "quantized": name in enabled,
            }
            if name in sensitivity:
                detail["sensitivity"] = round(sensitivity[name], 6)
            if name not in enabled:
                detail["reason"] = f"accuracy guard: {self.metric} drops {sensitivity[name]:.4f} when quantized alone"
                declined.append(f"{name} ({plan.layer.label}): kept float by the accuracy guard")
            details.append(detail)
        chosen = [plans[n] for n in plans if n in enabled]
        self._rewrite(gm, chosen)
        stats = {"linear": len(chosen), "activation-qdq": len({p.layer.act.name for p in chosen})}
        if len(chosen) < len(plans):
            stats["kept-float"] = len(plans) - len(chosen)
        return PassResult(program, modified=bool(chosen), stats=stats, declined=declined,
                          details=details, notes=notes)

    def _rewrite(self, gm: torch.fx.GraphModule, chosen: Sequence[_Plan]) -> None:
        by_act: dict[torch.fx.Node, list[_Plan]] = {}
        for plan in chosen:
            insert_weight_dequant(gm, plan.layer, *plan.weight, per_channel=plan.per_channel)
            by_act.setdefault(plan.layer.act, []).append(plan)
        for act, group in by_act.items():
            # consumers of one tensor share a QDQ pair when their ranges agree (they do: one observer)
            insert_activation_qdq(gm, act, [p.layer.node for p in group], group[0].qparams, group[0].act_dtype)

    def _guard(self, gm: torch.fx.GraphModule, plans: dict[str, _Plan], holdout: list[tuple[torch.Tensor, ...]],
               held_out: bool) -> tuple[set[str], dict[str, float], list[str]]:
        with torch.no_grad():
            refs = [gm(*b) for b in holdout]

        def drop(enabled: set[str]) -> float:
            emu = _Emulator(gm, plans, enabled)
            with torch.no_grad():
                scores = [agreement(self.metric, _tuple(emu.run(*b)), _tuple(r)) for b, r in zip(holdout, refs)]
            return 1.0 - sum(scores) / len(scores)

        enabled = set(plans)
        full = drop(enabled)
        where = "held-out" if held_out else "calibration (too few batches to hold any out)"
        notes = [f"accuracy guard: {self.metric} drop {full:.4f} with every layer int8 on {where} batches "
                 f"(max_drop {self.max_drop})"]
        if full <= self.max_drop:
            return enabled, {}, notes
        sensitivity = {name: drop({name}) for name in plans}
        current = full
        for name in sorted(plans, key=lambda n: -sensitivity[n]):
            enabled.discard(name)
            current = drop(enabled)
            log.info("accuracy guard: %s stays float, drop now %.4f", name, current)
            if current <= self.max_drop:
                break
        kept = len(plans) - len(enabled)
        notes.append(f"accuracy guard: {kept} most sensitive layer(s) stay float; drop now {current:.4f}")
        return enabled, sensitivity, notes


def _tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)

