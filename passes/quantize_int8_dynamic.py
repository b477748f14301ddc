"""quantize-int8-dynamic: int8 weights, activations quantized at run time (no calibration)."""

from __future__ import annotations

import torch

from graphopt.ir.fx import fetch_attr, skip_note
from graphopt.passlib.linear_forms import as_linears
from graphopt.passlib.qdq import (
    REDUCE_RANGE_CHOICES,
    find_linears,
    insert_activation_qdq,
    insert_weight_dequant,
    quantize_weight,
    weight_bits,
)
from graphopt.transform.base import Option, Pass, PassResult, register_pass

__all__ = ["QuantizeInt8Dynamic"]


@register_pass
class QuantizeInt8Dynamic(Pass):
    """Quantize linears to int8 weights with dynamic per-tensor activation quantization.

    For when no calibration data is at hand: each activation's uint8 scale and
    zero point are computed from its own min/max on every call.
    Matches: GEMMs with a constant 2-D fp32 weight (``aten.linear``, and
    ``_addmm_activation``/``addmm``/``mm``/``matmul`` by a constant, first
    rewritten exactly into ``linear``, see graphopt.passlib.linear_forms;
    ``skip`` patterns, computed weights and matmuls of two activations are declined).
    Produces: int8 weight + ``dequantize_per_channel`` (symmetric, per row; 7-bit
    with ``reduce_range``, which ``auto`` turns on where this CPU's int8 kernels
    would saturate, see graphopt.hardware), and
    per activation ``choose_qparams.tensor`` -> ``quantize_per_tensor.tensor``
    -> ``dequantize_per_tensor.tensor`` (PT2E's dynamic reference form; ONNX:
    DynamicQuantizeLinear, run by ONNX Runtime as MatMulIntegerToFloat /
    DynamicQuantizeMatMul when exported with ``graphopt.runtimes.onnx_export.qdq_translations``).
    Requires shapes; preserves shapes. Approximate: tolerance 0.25 (atol = rtol),
    the same bound as quantize-int8 (dynamic ranges are per call, so never
    clipped; measured errors are below the static ones).
    Before/after: ``linear(x, w, b)`` -> ``s, z = choose_qparams(x);
    linear(dq(q(x, s, z)), dequantize_per_channel(w_int8, ws, 0, 0), b)``.
    """

    name = "quantize-int8-dynamic"
    options = (
        Option("per_channel", bool, True, "one weight scale per output row"),
        Option("reduce_range", str, "auto", "7-bit weights, for CPUs without a VNNI/AMX int8 dot product "
               "(auto: when this CPU has none)", choices=REDUCE_RANGE_CHOICES),
        Option("skip", list, (), "fnmatch patterns of module paths / node names to keep float"),
    )
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})
    exact = False
    tolerance = 0.25
    backend_notes = (
        "Inductor (freezing) lowers it to oneDNN dynamic qlinear; ONNX export needs "
        "graphopt.runtimes.onnx_export.qdq_translations (choose_qparams -> DynamicQuantizeLinear)."
    )

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm = program.gm
        unmatched = skip_note(gm, self.skip)  # before as_linears renames the GEMMs it rewrites
        rewritten, declined = as_linears(gm, self.skip)
        layers, found_declined = find_linears(gm, self.skip)
        declined += found_declined
        bits, bits_note = weight_bits(self.reduce_range)
        by_act: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for layer in layers:
            q, scale, zp = quantize_weight(fetch_attr(gm, layer.weight), per_channel=self.per_channel, bits=bits)
            insert_weight_dequant(gm, layer, q, scale, zp, per_channel=self.per_channel)
            by_act.setdefault(layer.act, []).append(layer.node)
        for act, users in by_act.items():
            insert_activation_qdq(gm, act, users, None, torch.uint8)
        stats = {"linear": len(layers), "activation-qdq": len(by_act)} if layers else {}
        stats.update({f"as-linear:{k}": v for k, v in rewritten.items()})
        notes = ([bits_note] if bits_note and layers else []) + unmatched
        return PassResult(program, modified=bool(layers) or bool(rewritten), stats=stats, declined=declined,
                          notes=notes)
