"""Pass instruments: hooks around every pass (TVM's PassInstrument).

The pass manager calls ``before_pass`` hooks in order and ``after_pass`` hooks
in reverse, so the timing instrument (last) measures only the pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from graphopt.errors import PostconditionError, first_line
from graphopt.metrics import allclose_report, max_abs_error
from graphopt.transform.shape_check import graph_digest, stale_shapes
from graphopt.transform.state import preserved_state

if TYPE_CHECKING:
    from graphopt.ir.program import Program
    from graphopt.transform.base import Pass, PassResult
    from graphopt.transform.manager import PassContext
    from graphopt.transform.report import PassRecord

__all__ = [
    "Instrument",
    "TimingInstrument",
    "OpHistogramInstrument",
    "VerifyEachInstrument",
    "PrintAfterChangeInstrument",
]

log = logging.getLogger(__name__)


class Instrument:
    """Base: override any hook. ``record`` is the pass's PassRecord."""

    def before_pass(self, p: Pass, program: Program, ctx: PassContext, record: PassRecord) -> None:
        pass

    def after_pass(
        self, p: Pass, program: Program, result: PassResult, ctx: PassContext, record: PassRecord
    ) -> None:
        pass

    def after_failure(self, p: Pass, program: Program, exc: BaseException, ctx: PassContext) -> None:
        pass


class TimingInstrument(Instrument):
    """Wall time of each pass into ``record.time_s``."""

    def before_pass(self, p, program, ctx, record):  # type: ignore[no-untyped-def]
        record.time_s = time.perf_counter()

    def after_pass(self, p, program, result, ctx, record):  # type: ignore[no-untyped-def]
        record.time_s = time.perf_counter() - record.time_s


class OpHistogramInstrument(Instrument):
    """Op histogram and parameter count before/after each pass."""

    def before_pass(self, p, program, ctx, record):  # type: ignore[no-untyped-def]
        record.ops_before = dict(program.op_histogram())
        record.params_before = program.num_parameters()

    def after_pass(self, p, program, result, ctx, record):  # type: ignore[no-untyped-def]
        record.ops_after = dict(program.op_histogram())
        record.params_after = program.num_parameters()


#: an exact pass on a Program that computes in bf16/fp16 is exact up to rounding in that dtype
ROUNDING_EPS = 2


def _rounding_floor(program: Program) -> float:
    """``ROUNDING_EPS`` x the machine epsilon of the least precise float dtype the Program
    computes in (0 for fp32 and wider: an exact pass's own tolerance is already above it)."""
    low = [v.dtype for n in program.gm.graph.nodes
           for v in (n.meta.get("val") if isinstance(n.meta.get("val"), (tuple, list)) else (n.meta.get("val"),))
           if isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16)]
    return ROUNDING_EPS * max((torch.finfo(d).eps for d in low), default=0.0)


#: an exact pass that reorders a reduction of n terms (one SDPA kernel instead of matmul, softmax,
#: matmul) may change it by ~n ulps: a sum's worst-case rounding error is (n-1)*u*sum|x_i| in any
#: order (Higham's gamma_n), so two orders differ by up to n*eps relative to the terms; softmax
#: then carries the scores' error into its weights. REASSOC_ULPS x eps x (longest reduction) covers
#: the 2.4e-5 (64 keys) and 5.7e-5 (200 keys) an fp32 SDPA differs from the decomposed softmax by,
#: both as far from an fp64 reference; REASSOC_CAP keeps real bugs (errors of 0.1 and up) visible.
REASSOC_ULPS = 4
REASSOC_CAP = 1e-3
_MATMULS = ("aten::mm", "aten::bmm", "aten::matmul", "aten::linear")
_SOFTMAXES = ("aten::softmax", "aten::_softmax", "aten::log_softmax", "aten::_log_softmax")


def _size(s: Any) -> int:
    if isinstance(s, int):
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)  # a symbolic size: its example value
    return int(hint) if isinstance(hint, int) else 0


def _reduction(node: Any) -> tuple[int, torch.dtype] | None:
    """(length, dtype) of the longest reduction ``node`` computes (matmul, softmax, SDPA), if any."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    name = target._schema.name
    args = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in node.args[:3]]
    vals = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.is_floating_point()]
    if not vals:
        return None
    if name in _MATMULS or name in ("aten::baddbmm", "aten::addmm"):
        x = args[1] if name in ("aten::baddbmm", "aten::addmm") else args[0]
        return (_size(x.shape[-1]), x.dtype) if isinstance(x, torch.Tensor) and x.dim() >= 1 else None
    if name in _SOFTMAXES:
        return _size(vals[0].shape[-1]), vals[0].dtype
    if name == "aten::scaled_dot_product_attention" and len(vals) >= 2 and vals[1].dim() >= 2:
        return max(_size(vals[0].shape[-1]), _size(vals[1].shape[-2])), vals[0].dtype
    return None


def _reassociation_floor(nodes: Iterable[torch.fx.Node]) -> float:
    """``REASSOC_ULPS`` x eps x n for the longest reduction (n terms) among ``nodes`` (those a
    pass created), at most ``REASSOC_CAP``: what reordering that reduction may change."""
    floor = 0.0
    for node in nodes:
        found = _reduction(node)
        if found is not None:
            n, dtype = found
            floor = max(floor, REASSOC_ULPS * torch.finfo(dtype).eps * n)
    return min(floor, REASSOC_CAP)


#: both verify runs draw the same random numbers (train-mode dropout in the model)
_VERIFY_SEED = 0


def _run(program: Program, inputs: Any) -> Any:
    """Outputs on ``inputs`` from the same buffer state and RNG seed each time, cloned before the
    state is put back (an output that aliases a buffer would otherwise show the restored value)."""
    with preserved_state(program), torch.random.fork_rng():
        torch.manual_seed(_VERIFY_SEED)
        outputs = program(*inputs)
        return [o.detach().clone() if isinstance(o, torch.Tensor) else o for o in outputs]


class VerifyEachInstrument(Instrument):
    """After each pass: graph lint, the Program still runs, outputs match the
    pre-pass Program within the pass's tolerance, and ``modified=False``
    really means the graph is unchanged.

    An exact pass is held to its tolerance, or to rounding in the Program's
    compute dtype when that is coarser: folding a batch norm into fp16
    weights, or summing bf16 rows in another order, is exact up to an ulp
    of that dtype (``ROUNDING_EPS`` x its epsilon, atol = rtol).

    It is also held to reassociation of the longest reduction among the nodes
    it created (``REASSOC_ULPS`` x eps x its length, at most ``REASSOC_CAP``):
    one SDPA kernel sums 200 keys in another order than matmul + softmax +
    matmul. Reductions a pass did not create give it no slack.

    Both runs start from the same state and RNG seed: buffers the graph mutates are put back
    after each (outputs are copied first), and train-mode dropout draws the same mask. A pass
    that did not modify the graph is not checked for numerics.
    A pass that modified the graph and declares it preserves ``shapes`` has its
    recorded ``meta["val"]`` compared, node by node, with a fresh propagation at the example sizes
    (:mod:`graphopt.transform.shape_check`); when
    propagation already failed on the graph before the pass, the pass is not blamed for it."""

    def __init__(self) -> None:
        self._reference: Any = None
        self._digest = ""
        self._floor = 0.0
        self._shapes_valid = False
        self._propagated_before = True
        self._nodes_before: set[torch.fx.Node] = set()

    def before_pass(self, p, program, ctx, record):  # type: ignore[no-untyped-def]
        self._reference = _run(program, ctx.verify_inputs(program))
        self._digest = graph_digest(program)
        self._floor = _rounding_floor(program) if p.exact else 0.0
        self._nodes_before = set(program.gm.graph.nodes)
        self._shapes_valid = ctx.analyses.is_valid("shapes")
        self._propagated_before = True
        if "shapes" in p.preserves and self._shapes_valid:
            try:  # shape_check keeps each propagation: a graph checked after the last pass is not propagated again
                stale_shapes(program)
            except Exception:
                self._propagated_before = False

    def after_pass(self, p, program, result, ctx, record):  # type: ignore[no-untyped-def]
        if not result.modified and graph_digest(program) != self._digest:
            raise PostconditionError(
                f"pass '{p.name}' returned modified=False but changed the graph; fix the pass"
            )
        try:
            program.gm.graph.lint()
        except Exception as e:
            raise PostconditionError(f"pass '{p.name}' left an invalid graph: {e}") from e
        try:
            outputs = _run(program, ctx.verify_inputs(program))
        except Exception as e:
            raise PostconditionError(
                f"pass '{p.name}' produced a Program that fails to run: {type(e).__name__}: "
                f"{first_line(e, with_type=False) if str(e).strip() else ''}"
            ) from e
        reason = None
        if result.modified:  # an unmodified graph computes what it did (train-mode dropout: same seed)
            created = [n for n in program.gm.graph.nodes if n not in self._nodes_before]
            floor = max(self._floor, _reassociation_floor(created) if p.exact else 0.0)
            reason = allclose_report(outputs, self._reference, max(p.tolerance, floor))
        self._nodes_before = set()
        if reason:
            raise PostconditionError(
                f"pass '{p.name}' changed the numerics beyond its tolerance: {reason}"
            )
        if result.modified and "shapes" in p.preserves and self._shapes_valid:
            try:
                stale = stale_shapes(program)
            except Exception as e:
                if not self._propagated_before:  # it failed before this pass too (e.g. torch's baddbmm meta)
                    stale = []
                else:
                    raise PostconditionError(
                        f"pass '{p.name}' declares it preserves shapes, but shapes no longer propagate "
                        f"through its result: {first_line(e, with_type=True)}"
                    ) from e
            if stale:
                raise PostconditionError(
                    f"pass '{p.name}' declares it preserves shapes but left stale meta['val'] on "
                    f"{len(stale)} node(s): {'; '.join(stale[:3])}; set meta['val'] on the nodes it "
                    "creates, or drop 'shapes' from its preserves"
                )
        record.verify_error = max(
            (max_abs_error(o, r) for o, r in zip(outputs, self._reference) if r.is_floating_point()),
            default=0.0,
        )
        self._reference = None


class PrintAfterChangeInstrument(Instrument):
    """Log the graph after every pass that modified it (``--print-after-change``)."""

    def __init__(self, sink: Any = None) -> None:
        self.sink = sink

    def after_pass(self, p, program, result, ctx, record):  # type: ignore[no-untyped-def]
        if not result.modified:
            return
        text = f"// after {p.step_text()}\n{program.gm.graph}"
        if self.sink is not None:
            self.sink(text)
        else:
            log.info("%s", text)
