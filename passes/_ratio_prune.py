"""Shared base of the ratio-driven structured-pruning passes (heads, FFN, MLP).

Each subclass names its unit and says which coupled groups it prunes; the
options (ratio, criterion, scope), the contract and the run loop live here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from graphopt.passlib.pruning import CRITERIA, check_ratio, run_ratio_prune
from graphopt.transform.base import Option, Pass, PassResult

__all__ = ["RatioPrunePass", "ratio_options"]


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
