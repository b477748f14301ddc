"""Memory of contiguous stages, and cuts that balance it or fit a budget.

A stage ``[a, b)`` (compute-node positions, see
:mod:`graphopt.passlib.partition`) needs its weights (every tensor its nodes
read, once; a weight several stages read counts in each) plus its activation
peak, from the same liveness the ``memory`` analysis computes
(:mod:`graphopt.transform.memory`) evaluated at one shape: at position ``p``
the stage holds every buffer live there in the whole Program (what it
received from the stage before, what it will send on, its own temporaries
and kernel scratch), and a stage after the first also holds the Program
inputs it received. This need only grows as a stage grows at either end, so
cutting greedily as late as the budget allows gives the fewest stages, and a
bisection over the budget gives the ``n`` stages whose largest need is least.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from graphopt.errors import PreconditionError
from graphopt.ir.fx import fetch_attr
from graphopt.ir.program import Program
from graphopt.passlib.partition import Cut, compute_nodes
from graphopt.transform.memory import MemoryAnalysis, format_bytes

__all__ = ["StageNeeds", "stage_needs", "fit_budget"]


@dataclass
class StageNeeds:
    """Per-position facts of one Program at one shape, and the stage needs they give."""

    order: list[torch.fx.Node]
    activations: list[int]  # activation bytes live at each position
    inputs: list[int]  # Program-input bytes live at each position
    reads: list[list[tuple[int, int]]]  # (tensor id, bytes) of the weights each node reads
    sizes: dict[str, int]

    def need(self, a: int, b: int, first: bool) -> tuple[int, int]:
        """(weights, activation peak) of the stage ``order[a:b]``; ``first``: it is stage 0."""
        seen: set[int] = set()
        weights = peak = 0
        for p in range(a, b):
            for key, size in self.reads[p]:
                if key not in seen:
                    seen.add(key)
                    weights += size
            peak = max(peak, self.activations[p] + (0 if first else self.inputs[p]))
        return weights, peak

    def greedy(self, start: int, budget: int, valid: set[int], first: bool) -> list[int] | None:
        """Cut positions after ``start`` making every stage fit ``budget``, each as
        long as it can be (the fewest stages); None when a stage cannot reach a cut."""
        n = len(self.order)
        cuts: list[int] = []
        a, is_first = start, first
        while a < n:
            seen: set[int] = set()
            weights = peak = 0
            best = None
            for b in range(a + 1, n + 1):
                for key, size in self.reads[b - 1]:
                    if key not in seen:
                        seen.add(key)
                        weights += size
                peak = max(peak, self.activations[b - 1] + (0 if is_first else self.inputs[b - 1]))
                if weights + peak > budget:
                    break
                if b == n or b in valid:
                    best = b
            if best is None:
                return None
            if best < n:
                cuts.append(best)
            a, is_first = best, False
        return cuts

    def balanced(self, start: int, n: int, valid: set[int], first: bool) -> tuple[list[int], int]:
        """``n - 1`` cuts after ``start`` whose largest stage need is least, and that need."""
        hi = sum(self.need(start, len(self.order), first))
        lo = 0
        best = self.greedy(start, hi, valid, first) or []
        while lo < hi:  # smallest budget the greedy fits in n stages
            mid = (lo + hi) // 2
            cuts = self.greedy(start, mid, valid, first)
            if cuts is not None and len(cuts) <= n - 1:
                hi, best = mid, cuts
            else:
                lo = mid + 1
        return _split_to(best, n - 1, start, len(self.order), valid), hi


def _split_to(cuts: list[int], wanted: int, start: int, end: int, valid: set[int]) -> list[int]:
    """Add cuts (splitting the longest stage at its most central valid point) up to ``wanted``;
    splitting a stage never raises any stage's need."""
    cuts = sorted(cuts)
    while len(cuts) < wanted:
        bounds = [start, *cuts, end]
        options = []
        for a, b in zip(bounds, bounds[1:]):
            inside = [p for p in valid if a < p < b]
            if inside:
                options.append((b - a, min(inside, key=lambda p: abs(p - (a + b) / 2))))
        if not options:
            break
        cuts = sorted([*cuts, max(options)[1]])
    return cuts


def stage_needs(program: Program, analysis: MemoryAnalysis, batch: int | None, seq: int | None) -> StageNeeds:
    """The per-position needs of ``program`` at ``batch``/``seq`` (None: the example size)."""
    order = compute_nodes(program.gm)
    if [n.name for n in order] != analysis.order:
        raise PreconditionError(f"{program.name}: the memory analysis is stale (the graph changed); recompute it")
    sizes = analysis.resolve({"batch": batch, "seq": seq})
    activations, inputs = analysis.live_profile(sizes)
    reads = []
    for node in order:
        mine = []
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                value = fetch_attr(program.gm, str(arg.target))
                if isinstance(value, torch.Tensor):
                    mine.append((id(value), value.numel() * value.element_size()))
        reads.append(mine)
    return StageNeeds(order, activations, inputs, reads, sizes)


def fit_budget(
    needs: StageNeeds, cuts: Sequence[Cut], budget: int, start: int, program: str
) -> list[int]:
    """The fewest stages (cut positions after ``start``) that each fit ``budget``; a
    PreconditionError naming the smallest per-stage need when none do."""
    valid = {c.position for c in cuts if c.splittable and c.position > start}
    found = needs.greedy(start, budget, valid, first=start == 0)
    if found is not None:
        return found
    most = len(valid) + 1
    cuts_at, least = needs.balanced(start, most, valid, first=start == 0)
    bounds = [start, *cuts_at, len(needs.order)]
    worst = max(range(len(bounds) - 1), key=lambda k: sum(needs.need(bounds[k], bounds[k + 1], start == 0 and k == 0)))
    a, b = bounds[worst], bounds[worst + 1]
    peak = max(range(a, b), key=lambda p: needs.activations[p] + (0 if start == 0 and worst == 0 else needs.inputs[p]))
    at = ", ".join(f"{k}={v}" for k, v in needs.sizes.items()) or "its static shape"
    raise PreconditionError(
        f"{program} cannot be split into stages of at most {format_bytes(budget)} at {at}: "
        f"the smallest per-stage need (weights + activation peak) is {format_bytes(least)}, "
        f"the stage around node {needs.order[peak].name}, even with {most} stages; "
        "raise max_memory, lower batch/seq, or shrink the model (e.g. quantize-int8, cast)"
    )

