"""quantize-int8-weights: int8 linear weights (per output row), float activations."""

from __future__ import annotations

import torch
import torch.fx

from graphopt.ir.fx import fetch_attr, skip_note, where
from graphopt.passlib.linear_forms import as_linears
from graphopt.passlib.qdq import find_linears, insert_weight_dequant, quantize_weight
from graphopt.transform.base import Option, Pass, PassResult, register_pass

__all__ = ["QuantizeInt8Weights"]


@register_pass
class QuantizeInt8Weights(Pass):
    """Store linear weights as int8 (weight-only): a quarter of the bytes, activations stay fp32.

    For size (the ``Os`` preset), not for int8 arithmetic: no calibration, no
    activation quantization, so every backend can run it, TensorRT included
    (a symmetric int8 weight with a zero zero point is TensorRT's weight-only
    form). Matches: ``aten.linear`` with a constant 2-D fp32 weight, and ``x @ W`` / ``mm`` / ``addmm`` by a
    parameter, first rewritten exactly into one (graphopt.passlib.linear_forms) (``skip``
    patterns, computed weights and matmuls of two activations are declined; so is a weight
    another op also reads, such as an output head tied to its embedding table: an int8 copy
    beside the fp32 tensor the lookup keeps would add bytes; quantize-embeddings declines
    tied tables likewise).
    Produces: an int8 weight (symmetric, one scale per output row, zero point
    0) read through ``quantized_decomposed.dequantize_per_channel``, so each
    weight is within ``scale / 2 = max|row| / 254`` of the original. ONNX:
    ``DequantizeLinear(axis=0)`` into the MatMul/Gemm. Requires shapes;
    preserves shapes. Approximate: tolerance 0.05 (atol = rtol; measured
    max error 0.004 on dlrm:tiny, 0.01 on two-tower:tiny).
    Before/after: ``linear(x, w, b)`` -> ``linear(x, dequantize_per_channel(w_int8, s, 0, axis=0), b)``.
    """

    name = "quantize-int8-weights"
    options = (Option("skip", list, (), "fnmatch patterns of module paths / node names to keep float"),)
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})
    exact = False
    tolerance = 0.05
    backend_notes = ("Weight-only: ONNX DequantizeLinear -> MatMul (TensorRT weight-only int8); "
                     "Inductor keeps the int8 constants and dequantizes them in a kernel before the fp32 GEMM.")

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm = program.gm
        unmatched = skip_note(gm, self.skip)  # before as_linears renames the GEMMs it rewrites
        # x @ W, addmm, mm by a parameter: exactly a linear (as quantize-int8 reads them); find_linears
        # alone declined ``x @ W`` as a "matmul of computed operands"
        rewritten, declined = as_linears(gm, self.skip)
        layers, found_declined = find_linears(gm, self.skip)
        declined += found_declined
        saved = 0
        for layer in list(layers):
            other = _other_reader(gm, layer.node, fetch_attr(gm, layer.weight))
            if other is not None:
                layers.remove(layer)
                declined.append(f"{where(layer.node)}: its weight is also read by {where(other)} (tied); an int8 "
                                "copy beside the fp32 one would add bytes, so it stays fp32")
                continue
            w = fetch_attr(gm, layer.weight)
            q, scale, zp = quantize_weight(w, per_channel=True, bits=8)
            insert_weight_dequant(gm, layer, q, scale, zp, per_channel=True)
            saved += w.numel() * 3 - scale.numel() * 12
        stats = {"linear": len(layers)} if layers else {}
        stats.update({f"as-linear:{k}": v for k, v in rewritten.items()})
        details = [{"weight_bytes_saved": saved}] if layers else []
        return PassResult(program, modified=bool(layers) or bool(rewritten), stats=stats, declined=declined,
                          details=details, notes=unmatched)


def _other_reader(gm: torch.fx.GraphModule, linear: torch.fx.Node, weight: torch.Tensor) -> torch.fx.Node | None:
    """A node other than ``linear`` that reads ``weight``'s storage (through any get_attr naming it)."""
    storage = weight.untyped_storage().data_ptr()
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = fetch_attr(gm, str(node.target))
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == storage:
            for user in node.users:
                if user is not linear:
                    return user
    return None
