"""cast: run a Program in bf16/fp16, keeping numerically sensitive ops in fp32."""

from __future__ import annotations

import torch
import torch.fx
from torch._guards import detect_fake_mode

from graphopt.errors import PassOptionError
from graphopt.ir.fx import fetch_attr, is_op
from graphopt.ir.shapes import infer_val
from graphopt.passlib.qdq import is_qdq
from graphopt.transform.base import Option, Pass, PassResult, register_pass

__all__ = ["Cast"]

aten = torch.ops.aten

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: keep-list entries naming op families; any other entry names an aten op (``gelu``)
_FAMILIES: dict[str, tuple[str, ...]] = {
    "layer_norm": ("layer_norm", "native_layer_norm"),
    "rms_norm": ("rms_norm",),
    "group_norm": ("group_norm", "native_group_norm"),
    "batch_norm": ("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit"),
    "softmax": ("softmax", "_softmax"),
    "log_softmax": ("log_softmax", "_log_softmax"),
    "reductions": ("sum", "mean", "logsumexp", "nll_loss", "nll_loss_forward", "mse_loss",
                   "binary_cross_entropy_with_logits", "cross_entropy_loss"),
}
_SCORE_OPS = (aten.linear, aten.matmul, aten.mm, aten.bmm, aten.addmm)
_SCORE_THROUGH = (aten.view, aten.reshape, aten._unsafe_view, aten.select, aten.slice, aten.squeeze,
                  aten.unsqueeze, aten.clone, aten.add, aten.sub, aten.mul, aten.div)
DEFAULT_KEEP = ("layer_norm", "softmax", "log_softmax", "reductions")
#: atol = rtol held by verify-each. Measured max |error| vs fp32 at batch 32: bf16 0.004
#: (bert4rec:tiny), 0.017 (dlrm:tiny); fp16 0.0004 / 0.002. Base sizes: see the issue note.
TOLERANCE = {"bf16": 0.1, "fp16": 0.02}


def _check_keep(entries: tuple[str, ...]) -> str | None:
    for e in entries:
        if e not in _FAMILIES and e != "score" and not hasattr(aten, e):
            return f"{e!r} is neither an op family ({', '.join(_FAMILIES)}, score) nor an aten op"
    return None


def _is_float(val: object) -> bool:
    return isinstance(val, torch.Tensor) and val.is_floating_point()


@register_pass
class Cast(Pass):
    """Cast weights and compute to bf16/fp16, keeping sensitive ops in fp32.

    Matches: every call whose floating tensors are fp32. Ops in ``keep``
    (families: layer_norm, rms_norm, group_norm, batch_norm, softmax,
    log_softmax, reductions (loss-like sums/means), ``score`` = the last
    linear/matmul feeding each output with its bias; or any aten op name) run
    in fp32. Produces: low-precision weights where all readers compute low,
    and one ``aten._to_copy`` per (tensor, dtype) at each precision boundary;
    ``dtype=float32`` arguments (``_to_copy``, ``full``, ``arange``) in the
    low-precision region become the target dtype. Inputs and outputs keep fp32
    unless ``io=native`` (then float inputs/outputs are low precision, and the
    verify inputs are cast to match). Requires shapes; preserves shapes (every
    node's meta["val"] is re-inferred). Approximate: tolerance 0.1 (bf16) /
    0.02 (fp16), atol = rtol, from the max error measured on the zoo models.
    Backends: bf16 pays on CPUs with native bf16 matmuls (AVX512-BF16, AMX)
    and GPUs; on a CPU without them it is emulated and slower than fp32. fp16
    is meant for GPU backends (CPUs have no fast fp16 matmuls). ONNX Runtime's
    CPU provider has no bf16 kernels, so its lowerer refuses bf16 Programs.
    Before/after: ``layer_norm(linear(x, w))`` ->
    ``layer_norm(_to_copy(linear(_to_copy(x, bf16), w_bf16), fp32))``.
    """

    name = "cast"
    options = (
        Option("dtype", str, "bf16", "target dtype", choices=tuple(_DTYPES)),
        Option("keep", list, DEFAULT_KEEP, "op families / aten ops kept in fp32 (add 'score' for the head)",
               check=_check_keep),
        Option("io", str, "preserve", "inputs/outputs: keep their dtypes or use the target's",
               choices=("preserve", "native")),
    )
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})
    exact = False
    tolerance = TOLERANCE["bf16"]  # the default dtype; validate() picks per dtype
    backend_notes = (
        "bf16 pays where matmuls are native bf16 (AVX512-BF16, AMX, GPUs), emulated and slower elsewhere; "
        "fp16 is for GPU backends; ONNX Runtime CPU has no bf16 kernels: its lowerer refuses bf16 Programs."
    )

    def validate(self) -> None:
        if not self.keep and self.dtype == "fp16":
            raise PassOptionError("pass 'cast': fp16 with an empty keep-list overflows in softmax/layer_norm; keep them")
        self.tolerance = TOLERANCE[self.dtype]

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm, graph = program.gm, program.gm.graph
        low, high = _DTYPES[self.dtype], torch.float32
        keep_ops = [getattr(aten, op) for e in self.keep for op in _FAMILIES.get(e, (e,)) if hasattr(aten, op)]
        kept = {n for n in graph.nodes if n.op == "call_function" and is_op(n, *keep_ops)}
        if "score" in self.keep:
            kept |= _score_nodes(graph)
        casts: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node] = {}
        counts: dict[str, int] = {}

        def cast(arg: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
            if (arg, dtype) not in casts:
                with graph.inserting_after(arg):
                    c = graph.call_function(aten._to_copy.default, (arg,), {"dtype": dtype})
                infer_val(c)
                c.meta["graphopt.boundary_cast"] = True
                casts[(arg, dtype)] = c
                counts["boundary-cast"] = counts.get("boundary-cast", 0) + 1
            return casts[(arg, dtype)]

        counts.update(self._cast_attrs(gm, kept, low))
        if self.io == "native":
            counts.update(self._native_inputs(program, ctx, low))
        for node in list(graph.nodes):
            if node.op != "call_function" or node.meta.get("graphopt.boundary_cast") or is_qdq(node):
                continue
            if node.target is aten._assert_tensor_metadata.default:
                new = _val_dtype(node.args[0])
                if node.kwargs.get("dtype") in (high, low) and new is not None and new != node.kwargs["dtype"]:
                    node.update_kwarg("dtype", new)
                continue
            if node.target.__name__ == "getitem" or not _touches_float(node):
                infer_val(node)
                continue
            want = high if node in kept else low
            for arg in list(node.all_input_nodes):
                if _val_dtype(arg) in (high, low) and _val_dtype(arg) != want:  # a dequantized tensor too
                    node.replace_input_with(arg, cast(arg, want))
            if node.kwargs.get("dtype") == high and want == low:
                node.update_kwarg("dtype", low)
                counts["dtype-arg"] = counts.get("dtype-arg", 0) + 1
            infer_val(node)
            if node in kept:
                counts["kept-fp32"] = counts.get("kept-fp32", 0) + 1
        out = next(n for n in graph.nodes if n.op == "output")
        if self.io == "preserve":
            for arg in list(out.all_input_nodes):
                if _val_dtype(arg) == low:
                    out.replace_input_with(arg, cast(arg, high))
        modified = bool(counts.get("weight") or counts.get("boundary-cast") or counts.get("dtype-arg"))
        return PassResult(program, modified=modified, stats=counts)

    def _cast_attrs(self, gm: torch.fx.GraphModule, kept: set[torch.fx.Node], low: torch.dtype) -> dict[str, int]:
        """Store fp32 weights in ``low`` when no kept op reads them directly."""
        n = 0
        for node in gm.graph.nodes:
            if node.op != "get_attr" or not node.users or any(u in kept for u in node.users):
                continue
            value = fetch_attr(gm, node.target)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
                continue
            owner_path, _, leaf = node.target.rpartition(".")
            owner = fetch_attr(gm, owner_path) if owner_path else gm
            new = value.detach().to(low)
            if leaf in owner._parameters:
                owner._parameters[leaf] = torch.nn.Parameter(new, requires_grad=False)
            else:
                owner._buffers[leaf] = new
            node.meta["val"] = new
            n += 1
        return {"weight": n} if n else {}

    def _native_inputs(self, program, ctx, low: torch.dtype) -> dict[str, int]:  # type: ignore[no-untyped-def]
        placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
        n = 0
        for spec, ph in zip(program.inputs, placeholders):
            if spec.dtype != torch.float32:
                continue
            spec.dtype = low
            mode = detect_fake_mode([ph.meta["val"]])
            with mode:
                ph.meta["val"] = ph.meta["val"].to(low)
            n += 1
        if n:
            program.example_inputs = _to_specs(program.example_inputs, program.inputs)
            ctx.example_inputs = _to_specs(ctx.example_inputs, program.inputs)
        return {"native-input": n} if n else {}


def _to_specs(values, specs):  # type: ignore[no-untyped-def]
    if values is None:
        return None
    return tuple(v.to(s.dtype) if v.is_floating_point() else v for v, s in zip(values, specs))


def _val_dtype(node: object) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _touches_float(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    outs = val if isinstance(val, (tuple, list)) else [val]
    return any(_is_float(v) for v in outs) or any(_is_float(a.meta.get("val")) for a in node.all_input_nodes)


def _score_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The last linear/matmul feeding each output, and the views/bias ops after it."""
    out = next(n for n in graph.nodes if n.op == "output")
    found: set[torch.fx.Node] = set()
    stack = list(out.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in found or node.op != "call_function":
            continue
        if is_op(node, *_SCORE_OPS):
            found.add(node)
        elif is_op(node, *_SCORE_THROUGH):
            found.add(node)
            stack.extend(a for a in node.all_input_nodes if _is_float(a.meta.get("val")))
    return found
