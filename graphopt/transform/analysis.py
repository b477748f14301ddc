"""Analyses over a Program, computed lazily and cached by the pass manager.

``shapes``: re-propagates ``meta["val"]`` (fake tensors with the Program's
symbolic sizes) through every node with FakeTensorProp.
``flops``: FLOPs of one run on the example inputs (torch's FlopCounterMode).
``memory``: weights by kind and dtype, and the activation peak from tensor
liveness, symbolic in the dynamic dims (:mod:`graphopt.transform.memory`);
computed after ``shapes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphopt.errors import PreconditionError
from graphopt.ir.shapes import fake_call
from graphopt.transform.memory import analyze_memory

if TYPE_CHECKING:
    from graphopt.ir.program import Program

__all__ = ["propagate_shapes", "count_flops", "analyze_memory", "AnalysisManager", "ANALYSES", "DEPENDS"]


class _ShapeProp(FakeTensorProp):
    """FakeTensorProp whose calls go through :func:`graphopt.ir.shapes.fake_call`."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return fake_call(target, args, kwargs)


def _placeholder_vals(program: Program) -> list[Any]:
    vals = [n.meta.get("val") for n in program.gm.graph.nodes if n.op == "placeholder"]
    if any(v is None for v in vals):
        raise PreconditionError(
            f"{program.name}: placeholders lack shape metadata; re-capture with graphopt.capture"
        )
    return vals


def _hint(size: Any) -> int:
    """The example value of a size (2 for an unbacked symbol: sizes 0 and 1 would specialise)."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    hint = size.node.hint
    return int(hint) if hint is not None else 2


def _at_examples(vals: list[Any]) -> list[Any]:
    """Static fakes like ``vals`` at their example sizes (each symbolic size's hint), in a new
    FakeTensorMode and ShapeEnv: nothing a propagation learns can reach the Program's symbols (its
    ShapeEnv is shared by every ``Program.copy()``; a guard added to it, ``seq == 16``, would
    specialise every copy in the process), no symbolic arithmetic is done (6x faster on t5-rec:tiny's
    O2: 1.1 s for ten propagations instead of 7.0, AMD EPYC, 2026-12-07). The ShapeEnv is there for
    sizes no propagation knows in advance (unbacked symbols), as in the symbolic propagation."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)
    return [mode.from_tensor(torch.zeros([_hint(d) for d in v.shape], dtype=v.dtype, device=v.device))
            if isinstance(v, torch.Tensor) else v for v in vals]


def propagate_shapes(program: Program, *, at_examples: bool = False) -> None:
    """Fill ``meta["val"]`` on every node from the placeholders' symbolic fakes.

    ``at_examples=True`` propagates static fakes at the placeholders' example sizes instead, in a
    fake mode of its own (verify-each's shape check, which compares and then restores the metadata).
    """
    gm = program.gm
    vals = _placeholder_vals(program)
    if at_examples:
        vals = _at_examples(vals)
    mode = detect_fake_mode(vals)
    if mode is None:
        raise PreconditionError(f"{program.name}: placeholder metadata holds no fake tensors")
    allow = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        _ShapeProp(gm, mode).propagate_dont_convert_inputs(*vals)
    finally:
        mode.allow_non_fake_inputs = allow


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(program: Program, inputs: tuple[torch.Tensor, ...] | None = None) -> int:
    """FLOPs of one forward on ``inputs`` (default: the example inputs).

    torch's FlopCounterMode has no formula for the CPU SDPA kernels, so
    attention is counted with its SDPA formula here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            custom[op] = _cpu_sdpa_flops
    args = inputs if inputs is not None else program.sample_inputs()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        program.gm(*args)
    return int(counter.get_total_flops())


ANALYSES: dict[str, Callable[[Program], Any]] = {
    "shapes": propagate_shapes,
    "flops": count_flops,
    "memory": analyze_memory,
}
#: analyses computed (and valid) before another: memory reads fresh meta["val"]
DEPENDS: dict[str, tuple[str, ...]] = {"memory": ("shapes",)}


class AnalysisManager:
    """Caches analysis results per Program; ``invalidate`` keeps the preserved ones."""

    def __init__(self) -> None:
        self._valid: dict[str, Any] = {}

    def get(self, name: str, program: Program) -> Any:
        if name not in self._valid:
            if name not in ANALYSES:
                raise PreconditionError(f"unknown analysis '{name}'; known: {', '.join(ANALYSES)}")
            for dep in DEPENDS.get(name, ()):
                self.get(dep, program)
            self._valid[name] = ANALYSES[name](program)
        return self._valid[name]

    def mark_valid(self, name: str, value: Any = None) -> None:
        """Record that ``name`` holds for the current Program (e.g. fresh from capture)."""
        self._valid[name] = value

    def is_valid(self, name: str) -> bool:
        return name in self._valid

    def invalidate(self, preserved: frozenset[str] = frozenset()) -> None:
        self._valid = {k: v for k, v in self._valid.items() if k in preserved}
