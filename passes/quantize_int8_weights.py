"""quantize-int8-weights: int8 linear weights (per output row), float activations."""

from __future__ import annotations

import torch
import torch.fx

from graphopt.ir.fx import drop_unused_attrs, fetch_attr, is_op, skip_note, where
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
    patterns, computed weights and matmuls of two activations are declined). An output head
    tied to its embedding table (GPT-2's ``h @ wte.t()``, T5's ``lm_head``) is quantized once:
    the lookups read rows of the same dequantized int8 weight (its per-row scales are the
    head's per-output-channel scales), so one int8 copy replaces the fp32 table; a weight
    any other op reads is declined (an int8 copy beside the fp32 one would add bytes).
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
        saved, tied = 0, 0
        for layer in list(layers):
            others = _other_readers(gm, layer.node, fetch_attr(gm, layer.weight))
            odd = next((user for attr, user in others if not _is_lookup(user, attr)), None)
            if odd is not None:
                layers.remove(layer)
                declined.append(f"{where(layer.node)}: its weight is also read by {where(odd)}; an int8 copy "
                                "beside the fp32 one would add bytes, so it stays fp32")
                continue
            w = fetch_attr(gm, layer.weight)
            q, scale, zp = quantize_weight(w, per_channel=True, bits=8)
            dq = insert_weight_dequant(gm, layer, q, scale, zp, per_channel=True)
            if others:  # a table tied to this head: its lookups read the same int8 rows (one copy, not two)
                _share(gm, dq, others, w)
                tied += len(others)
            saved += w.numel() * 3 - scale.numel() * 12
        if tied:
            drop_unused_attrs(gm)
        stats = {"linear": len(layers)} if layers else {}
        stats.update({"tied-lookup": tied} if tied else {})
        stats.update({f"as-linear:{k}": v for k, v in rewritten.items()})
        details = [{"weight_bytes_saved": saved}] if layers else []
        return PassResult(program, modified=bool(layers) or bool(rewritten), stats=stats, declined=declined,
                          details=details, notes=unmatched)


def _other_readers(gm: torch.fx.GraphModule, linear: torch.fx.Node,
                   weight: torch.Tensor) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(get_attr, reader) for every node other than ``linear`` that reads ``weight``'s storage."""
    storage = weight.untyped_storage().data_ptr()
    found = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = fetch_attr(gm, str(node.target))
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == storage:
            found += [(node, user) for user in node.users if user is not linear]
    return found


def _is_lookup(user: torch.fx.Node, attr: torch.fx.Node) -> bool:
    """``embedding(table, ids)`` reading the tied weight as its table (rows = the head's output rows)."""
    return is_op(user, torch.ops.aten.embedding.default) and user.args[0] is attr and attr not in user.args[1:]


def _share(gm: torch.fx.GraphModule, dq: torch.fx.Node, others: list[tuple[torch.fx.Node, torch.fx.Node]],
           weight: torch.Tensor) -> None:
    """Point the tied lookups at the head's dequantized int8 weight, moved before the first of them;
    every get_attr of the fp32 weight left unread goes (capture can leave one with no reader)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min((user for _, user in others), key=order.__getitem__)
    if order[first] < order[dq]:
        for node in [*dq.args[:3], dq]:  # the int8 weight, its scales and zero points, the dequantize
            first.prepend(node)
    for attr, user in others:
        user.replace_input_with(attr, dq)
    storage = weight.untyped_storage().data_ptr()
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            value = fetch_attr(gm, str(node.target))
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == storage:
                gm.graph.erase_node(node)
