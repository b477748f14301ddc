"""Shared base of the ratio-driven structured-pruning passes (heads, FFN, MLP).

Each subclass names its unit and says which coupled groups it prunes; the
options (ratio, criterion, scope), the contract and the run loop live here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from graphopt.ir.program import Program
from graphopt.passlib.pruning import (
    CRITERIA,
    PruneGroup,
    apply_groups,
    check_ratio,
    group_importance,
    select_removals,
    taylor_saliency,
)
from graphopt.transform.analysis import count_flops
from graphopt.transform.base import Option, Pass, PassResult
from graphopt.transform.manager import PassContext

__all__ = ["RatioPrunePass", "ratio_options", "run_ratio_prune"]


def ratio_options(unit: str) -> tuple[Option, ...]:
    return (
        Option("ratio", float, 0.3, f"fraction of {unit} to remove, in [0, 1)", check=check_ratio),
        Option("criterion", str, "l1", f"importance of {unit}", choices=CRITERIA),
        Option("scope", str, "layer", f"rank {unit} per layer or across all layers", choices=("layer", "global")),
    )


class RatioPrunePass(Pass):
    """Base class (not registered): prune ``ratio`` of each layer's ``unit``s.

    Approximate with tolerance=inf: pruning changes outputs by design, so
    verify-each only checks that the Program lints, runs and keeps its output
    shapes; the tests hold ratio 0 to 1e-5 and ratio > 0 to a top-10 overlap.
    ``taylor`` adds calibration data to the requirements.
    """

    unit: ClassVar[str] = "units"
    requires = frozenset({"shapes"})
    exact = False
    tolerance = float("inf")
    backend_notes = "shrinks weights and shapes: every backend gets the smaller model"

    def validate(self) -> None:
        if self.criterion == "taylor":
            self.requires = type(self).requires | {"calibration_data"}

    def groups(self, gm: Any) -> tuple[list[Any], list[str]]:
        """The coupled groups this pass prunes, and why other candidates were declined."""
        raise NotImplementedError

    def run(self, program, ctx) -> PassResult:  # type: ignore[no-untyped-def]
        groups, declined = self.groups(program.gm)
        return run_ratio_prune(program, ctx, groups, declined, ratio=self.ratio,
                               criterion=self.criterion, scope=self.scope, unit=self.unit)


def run_ratio_prune(
    program: Program, ctx: PassContext, groups: list[PruneGroup], declined: list[str], *,
    ratio: float, criterion: str, scope: str, unit: str,
) -> PassResult:
    """The body shared by prune-heads/-ffn/-linear: score, select, check, apply.

    Everything up to :func:`select_removals` is analysis, so a bad ratio raises
    before the graph changes. Returns a PassResult with per-layer ``details``,
    one note per layer and the FLOPs on the verify inputs before/after."""
    gm = program.gm
    if not groups:
        return PassResult(program, modified=False, declined=declined)
    saliency = None
    if criterion == "taylor":
        targets = [s.node.args[s.arg].target for g in groups for s in g.slices if s.score]
        saliency = taylor_saliency(gm, targets, ctx.calibration_batches())
    scores = [group_importance(gm, g, criterion, saliency) for g in groups]
    removals = select_removals(groups, scores, ratio, scope)
    if not any(removals):
        return PassResult(program, modified=False, declined=declined,
                          notes=[f"ratio={ratio} removes no {unit} from {len(groups)} layers"])
    inputs = ctx.verify_inputs(program)
    flops_before = count_flops(program, inputs)
    details = apply_groups(gm, groups, removals)
    gm.recompile()
    flops_after = count_flops(program, inputs)
    notes = [
        f"{d['layer']}: {unit} {d['of']} -> {d['kept']} (removed {d['removed'][:8]}"
        f"{'...' if len(d['removed']) > 8 else ''}), -{d['params_removed']:,} params, "
        f"-{d['flops_removed_per_row']:,} FLOPs/row"
        for d in details
    ]
    drop = 100.0 * (flops_before - flops_after) / flops_before if flops_before else 0.0
    notes.append(f"FLOPs on the verify inputs {flops_before:,} -> {flops_after:,} (-{drop:.1f}%)")
    removed = sum(len(d["removed"]) for d in details)
    return PassResult(program, modified=True, stats={f"{unit}-removed": removed, "layers": len(details)},
                      declined=declined, details=details, notes=notes)
