"""cast: run a Program's matrix ops in bf16/fp16, keeping what decides the ranking in fp32."""

from __future__ import annotations

import torch
import torch.fx
from torch._guards import detect_fake_mode

from graphopt.errors import PassOptionError
from graphopt.ir.fx import fetch_attr, is_op, matches_skip, module_path, skip_note
from graphopt.ir.shapes import infer_val
from graphopt.passlib.precision import (
    ACCUMULATING_OPS,
    FP32_FAMILIES,
    LOW_PRECISION_OPS,
    VIEW_OPS,
    family_ops,
    score_nodes,
    tail_nodes,
    weight_readers,
)
from graphopt.passlib.qdq import is_qdq
from graphopt.transform.base import Option, Pass, PassResult, register_pass

__all__ = ["Cast", "DEFAULT_KEEP", "POLICIES", "TOLERANCE"]

aten = torch.ops.aten

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
POLICIES = ("mixed", "fast")
DEFAULT_KEEP = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "softmax", "log_softmax", "reductions", "score",
                "tail")
#: atol = rtol held by verify-each. Measured max |error| vs fp32 at batch 32: bf16 0.004
#: (bert4rec:tiny), 0.017 (dlrm:tiny); fp16 0.0004 / 0.002.
TOLERANCE = {"bf16": 0.1, "fp16": 0.02}


def _check_keep(entries: tuple[str, ...]) -> str | None:
    for e in entries:
        if e not in FP32_FAMILIES and e not in ("score", "tail") and not hasattr(aten, e):
            return f"{e!r} is neither an op family ({', '.join(FP32_FAMILIES)}, score, tail) nor an aten op"
    return None


@register_pass
class Cast(Pass):
    """Run matrix ops (and, with ``policy=fast``, everything else) in bf16/fp16.

    Matches every call whose floating tensors are fp32 and gives it a compute
    dtype by ``policy``:

    - ``mixed`` (default): matrix ops (linear, matmul/mm/bmm/addmm/baddbmm,
      ``_addmm_activation``, scaled_dot_product_attention, convolutions) take
      low-precision inputs and weights (oneDNN and Inductor accumulate them in
      fp32 and round the output); every other op computes in the dtype its
      inputs promote to, so the residual stream, embeddings and their sums stay
      fp32 and a GEMM's bf16 output is widened where it meets them. Without
      ``score``/``tail`` this is ``torch.autocast("cpu", bfloat16)``'s
      arithmetic, bit for bit (tested on MiniLM-L6).
    - ``fast``: every op but the ``keep`` families computes in low precision
      (a bf16 residual stream: looser ranking, not faster under Inductor here).

    ``keep`` runs in fp32 under both policies: layer/rms/group/batch norms,
    softmax, log_softmax, reductions (sums, means, and scatters that
    accumulate: index_add, embedding_bag, ...; reported as declined when
    their inputs were low), ``score`` = the last matrix op feeding each output
    with its bias (the catalogue's scores: bf16 keeps 8 bits, so nearby
    scores tie), ``tail`` = matrix ops on a sliver of the rows the others see
    (after prune-positions: the positions the outputs read, i.e. the last
    layer's query rows and FFN; 1/seq of a layer's cost), or any aten op.
    ``skip`` keeps single layers in fp32: fnmatch patterns matched against a
    node's module path and name, as ``quantize-int8``'s ``skip``
    (``skip=*.h.3.mlp.*``); the tuner's keep-float sets (ranked by per-layer int8
    sensitivity) use it for bf16 as well.

    Policy by measurement (``python benchmarks/bench_bf16_policy.py --checkpoint
    <demo checkpoint>``, 2026-12-02; AMD EPYC avx512_bf16/vnni, no AMX; eager
    numerics; top-10 overlap with eager fp32 over 8 x 32 rows, seq 64; and the
    demo's fine-tuned bert4rec:base on MovieLens-100K, 943 test users, change of
    HR@10 / NDCG@10 vs eager fp32):

    ==========================  =============  =============  ==============
    policy                      bert4rec:base  bert-cls:base  demo HR / NDCG
    ==========================  =============  =============  ==============
    torch.autocast              0.9898         0.9938         +0.0% / +0.8%
    fast, old keep list         0.9789         0.9914         -2.9% / -2.6%
    fast                        0.9813         0.9949         +0.0% / +2.2%
    mixed, no score/tail        0.9898         0.9938         +0.0% / +0.8%
    mixed, no tail              0.9918         0.9969         +0.0% / +3.0%
    mixed (default)             0.9996         0.9992         +0.0% / +0.0%
    ==========================  =============  =============  ==============

    The fp32 head lifts top-10 from autocast's level, the fp32 tail removes
    the rest; the fp32 residual stream is what ``fast`` gives up. Speed on
    Inductor next to the autocast peer: ``graphopt bench`` /
    ``benchmarks/headline.py`` (README headline table).

    Produces low-precision weights where every reader (through views)
    computes low, and one ``aten._to_copy`` per (tensor, dtype) at each
    precision boundary; views and explicit conversions follow their input;
    ``fast`` also turns ``dtype=float32`` arguments (``full``, ``arange``,
    ``_to_copy``) into the target dtype. Export's ``_assert_tensor_metadata``
    checks follow the new dtypes; a captured ``view`` that relied on fp32's
    output layout (T5 after bf16 SDPA) becomes a ``reshape``. Inputs and
    outputs keep their dtypes unless ``io=native``. Requires shapes;
    preserves shapes (re-inferred). Approximate: tolerance 0.1 (bf16) / 0.02
    (fp16), atol = rtol. Idempotent.

    Backends: bf16 pays where matmuls are native bf16 (AVX512-BF16, AMX,
    GPUs); fp16 is for GPU backends; ONNX Runtime's CPU provider has no bf16
    kernels, so its lowerer refuses bf16 Programs.
    Before/after (mixed): ``x + linear(layer_norm(x), w)`` ->
    ``x + _to_copy(linear(_to_copy(layer_norm(x), bf16), w_bf16), fp32)``.
    """

    name = "cast"
    options = (
        Option("dtype", str, "bf16", "target dtype", choices=tuple(_DTYPES)),
        Option("policy", str, "mixed", "mixed: matrix ops low, the rest fp32; fast: all low but keep",
               choices=POLICIES),
        Option("keep", list, DEFAULT_KEEP, "op families / aten ops kept in fp32 (score = the output head, "
               "tail = the rows prune-positions kept)",
               check=_check_keep),
        Option("skip", list, (), "fnmatch patterns of module paths / node names whose ops stay fp32"),
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
        if self.dtype == "fp16" and self.policy == "fast" and not {"layer_norm", "softmax"} <= set(self.keep):
            raise PassOptionError("pass 'cast': fp16 with policy=fast overflows in softmax/layer_norm; keep them")
        self.tolerance = TOLERANCE[self.dtype]

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        graph = program.gm.graph
        low, high = _DTYPES[self.dtype], torch.float32
        keep_ops = family_ops(self.keep)
        forced = {n for n in graph.nodes if n.op == "call_function" and is_op(n, *keep_ops)}
        if "score" in self.keep:
            forced |= score_nodes(graph)
        if "tail" in self.keep:
            forced |= tail_nodes(graph, LOW_PRECISION_OPS)
        skipped = {n for n in graph.nodes if n.op == "call_function" and matches_skip(n, self.skip)}
        unmatched = skip_note(program.gm, self.skip)  # a skip= that keeps nothing fp32 says so
        forced |= skipped
        counts: dict[str, int] = {}
        declined: list[str] = []
        out = next(n for n in graph.nodes if n.op == "output")
        captured = {n: _val_dtype(n) for n in out.all_input_nodes}  # io=preserve hands these back
        casts: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node] = {}

        def cast(arg: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
            if (arg, dtype) not in casts:
                with graph.inserting_after(arg):
                    c = graph.call_function(aten._to_copy.default, (arg,), {"dtype": dtype})
                infer_val(c)
                c.meta["graphopt.boundary_cast"] = True
                casts[(arg, dtype)] = c
                counts["boundary-cast"] = counts.get("boundary-cast", 0) + 1
            return casts[(arg, dtype)]

        def computes_low(node: torch.fx.Node) -> bool:
            """Decided before any dtype is known: does this reader compute in ``low``?"""
            if node in forced or node.op != "call_function" or is_qdq(node):
                return False
            if is_op(node, aten._to_copy):  # e.g. a boundary cast left by an earlier run
                return node.kwargs.get("dtype") == low
            return self.policy == "fast" or is_op(node, *LOW_PRECISION_OPS)

        counts.update(self._cast_attrs(program.gm, computes_low, low))
        if self.io == "native":
            counts.update(self._native_inputs(program, ctx, low))
        for node in list(graph.nodes):
            if node.op != "call_function" or node.meta.get("graphopt.boundary_cast") or is_qdq(node):
                continue
            if node.target is aten._assert_tensor_metadata.default:
                _follow_assert(node)
                continue
            if node.target.__name__ == "getitem" or not _touches_float(node):
                infer_val(node)
                continue
            want = self._compute_dtype(node, forced, low)
            had_low = any(_val_dtype(a) == low for a in node.all_input_nodes)
            if want is not None:
                for arg in list(node.all_input_nodes):
                    if _val_dtype(arg) in (high, low) and _val_dtype(arg) != want:  # a dequantized tensor too
                        node.replace_input_with(arg, cast(arg, want))
                if self.policy == "fast" and want == low and node.kwargs.get("dtype") == high:
                    node.update_kwarg("dtype", low)
                    counts["dtype-arg"] = counts.get("dtype-arg", 0) + 1
            if not _infer(node):
                counts["view-to-reshape"] = counts.get("view-to-reshape", 0) + 1
            if node in forced:
                counts["kept-fp32"] = counts.get("kept-fp32", 0) + 1
                if _is_accumulating(node) and (self.policy == "fast" or had_low):
                    declined.append(f"{node.name}: {node.target} accumulates (a bf16 sum keeps 8 bits; Inductor "
                                    "has no bf16 CPU kernel for it): kept fp32")
            elif _val_dtype(node) == low and is_op(node, *LOW_PRECISION_OPS):
                counts["low-matrix-op"] = counts.get("low-matrix-op", 0) + 1
        for arg in list(out.all_input_nodes):  # preserve: the captured dtype (a bf16 model's stays bf16)
            want = captured.get(arg) if self.io == "preserve" else low  # native: float outputs low
            if _val_dtype(arg) in _FLOATS and want in _FLOATS and _val_dtype(arg) != want:
                out.replace_input_with(arg, cast(arg, want))
        declined += [f"{n.name} ({module_path(n) or 'no module'}): matched skip, kept fp32" for n in graph.nodes
                     if n in skipped and is_op(n, *LOW_PRECISION_OPS)]
        modified = bool(counts.get("weight") or counts.get("boundary-cast") or counts.get("dtype-arg"))
        if not modified:  # a second cast: what it found is a note, not rewrites
            found = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            return PassResult(program, modified=False, declined=declined,
                              notes=[f"nothing left to cast to {low}" + (f" ({found})" if found else "")] + unmatched)
        return PassResult(program, modified=modified, stats=counts, declined=declined, notes=unmatched)

    def _compute_dtype(self, node: torch.fx.Node, forced: set[torch.fx.Node], low: torch.dtype) -> torch.dtype | None:
        """The dtype ``node``'s float inputs are cast to; None leaves them (and the node) as captured."""
        if node in forced:
            return torch.float32
        if is_op(node, aten._to_copy, *VIEW_OPS):  # conversions convert; views compute nothing: follow the input
            return None
        if self.policy == "fast" or is_op(node, *LOW_PRECISION_OPS):
            return low
        dtypes = {_val_dtype(a) for a in node.all_input_nodes} & {torch.float32, low}
        if not dtypes:
            return None  # creation ops (full, arange, scalar_tensor) keep their captured dtype
        return torch.float32 if torch.float32 in dtypes else low

    def _cast_attrs(self, gm: torch.fx.GraphModule, computes_low, low: torch.dtype) -> dict[str, int]:  # type: ignore[no-untyped-def]
        """Store fp32 weights in ``low`` when every reader (through views) computes low."""
        n = 0
        for node in gm.graph.nodes:
            if node.op != "get_attr" or not node.users:
                continue
            readers = weight_readers(node)
            if not readers or not all(computes_low(r) for r in readers):
                continue
            value = fetch_attr(gm, node.target)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
                continue
            owner_path, _, leaf = node.target.rpartition(".")
            owner = fetch_attr(gm, owner_path) if owner_path else gm
            new = value.detach().to(low)
            if leaf in owner._parameters:
                owner._parameters[leaf] = torch.nn.Parameter(new, requires_grad=False)
            elif leaf in owner._buffers:
                owner._buffers[leaf] = new
            else:  # a plain tensor attribute (export's lifted constants)
                setattr(owner, leaf, new)
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


def _follow_assert(node: torch.fx.Node) -> None:
    """``_assert_tensor_metadata(x, size, stride, dtype)``: the dtype (positional or keyword) follows x."""
    new = _val_dtype(node.args[0])
    if new is None or not new.is_floating_point:
        return
    if len(node.args) > 3 and isinstance(node.args[3], torch.dtype) and node.args[3].is_floating_point:
        node.update_arg(3, new)
    if isinstance(node.kwargs.get("dtype"), torch.dtype) and node.kwargs["dtype"].is_floating_point:
        node.update_kwarg("dtype", new)


def _infer(node: torch.fx.Node) -> bool:
    """Re-infer ``node``'s value. A low-precision kernel may lay its output out
    differently (bf16 SDPA on CPU returns another stride order than fp32), so a
    captured ``view`` that relied on the fp32 layout becomes a ``reshape``
    (which copies only where a view cannot be taken). False when that happened."""
    try:
        infer_val(node)
        return True
    except (RuntimeError, ValueError) as e:  # "view size is not compatible", "Cannot view a tensor"
        if node.target is not aten.view.default or "view" not in str(e):
            raise
    node.target = aten.reshape.default
    infer_val(node)
    return False


def _is_accumulating(node: torch.fx.Node) -> bool:
    return getattr(getattr(node.target, "overloadpacket", None), "__name__", "") in ACCUMULATING_OPS


def _to_specs(values, specs):  # type: ignore[no-untyped-def]
    if values is None:
        return None
    return tuple(v.to(s.dtype) if v.is_floating_point() else v for v, s in zip(values, specs))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _val_dtype(node: object) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _is_float(val: object) -> bool:
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _touches_float(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    outs = val if isinstance(val, (tuple, list)) else [val]
    return any(_is_float(v) for v in outs) or any(_is_float(a.meta.get("val")) for a in node.all_input_nodes)
