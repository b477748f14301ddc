"""split-stages: partition a Program into n contiguous stages (for the ``stages`` runtime)."""

from __future__ import annotations

from typing import Any

import torch

from graphopt.errors import PassOptionError, PreconditionError
from graphopt.ir.fx import fetch_attr, is_op
from graphopt.passlib.costs import node_flops
from graphopt.passlib.partition import (
    STAGE_META,
    Cut,
    StagePartition,
    compute_nodes,
    cut_table,
    set_stage_partition,
)
from graphopt.passlib.stage_memory import StageNeeds, fit_budget, stage_needs
from graphopt.transform.base import Option, Pass, PassResult, register_pass
from graphopt.transform.memory import analyze_memory, format_bytes, parse_bytes

__all__ = ["SplitStages"]

aten = torch.ops.aten

_EMBEDDING_OPS = (aten.embedding, aten.embedding_bag, aten._embedding_bag, aten._embedding_bag_forward_only)


def _weight_bytes(gm: torch.fx.GraphModule, node: torch.fx.Node, seen: set[int]) -> int:
    """Bytes of the weights ``node`` reads that no earlier node read."""
    total = 0
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            value = fetch_attr(gm, arg.target)
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total


def _node_costs(gm: torch.fx.GraphModule, order: list[torch.fx.Node], balance: str) -> list[int]:
    """Additive per-node costs of balance=params|flops (memory is not additive: see stage_memory)."""
    seen: set[int] = set()
    if balance == "params":
        return [_weight_bytes(gm, node, seen) for node in order]
    return [node_flops(node) for node in order]


def _check_bytes(value: str) -> str | None:
    if value == "none":
        return None
    try:
        parse_bytes(value)
    except ValueError as e:
        return str(e)
    return None


def _embeddings_first(gm: torch.fx.GraphModule) -> tuple[int, bool]:
    """Move embedding lookups (and what they need) to the front of the compute
    order; return how many compute nodes form that group and whether the graph moved."""
    order = compute_nodes(gm)
    group: set[torch.fx.Node] = set()
    stack = [n for n in order if is_op(n, *_EMBEDDING_OPS)]
    stack += [u for n in list(stack) for u in n.users if not isinstance(n.meta.get("val"), torch.Tensor)]
    while stack:
        node = stack.pop()
        if node in group or node.op in ("placeholder", "get_attr"):
            continue
        group.add(node)
        stack.extend(node.all_input_nodes)
    if not group:
        return 0, False
    for node in order:  # guards and asserts on what the group already has stay with it
        if not node.users and all(
            a in group or a.op in ("placeholder", "get_attr") for a in node.all_input_nodes
        ):
            group.add(node)
    new_order = [n for n in order if n in group] + [n for n in order if n not in group]
    if new_order == order:
        return len(group), False
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for node in new_order:  # move each in turn before the output: topological by construction
        output.prepend(node)
    return len(group), True


def _choose_cuts(cuts: list[Cut], costs: list[int], first: int, n: int, slack: float) -> list[int]:
    """Greedy, left to right: aim each cut at an equal share of the cost after
    ``first``; within ``slack`` of that share, take the cut crossing fewest bytes."""
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    base, total = prefix[first], prefix[-1] - prefix[first]
    window = slack * total / n
    chosen: list[int] = []
    valid = [c for c in cuts if c.splittable and c.position > first]
    for k in range(1, n):
        target = base + total * k / n
        left = n - 1 - k  # cuts still needed after this one
        pool = [c for c in valid if c.position > (chosen[-1] if chosen else first)]
        pool = pool[: len(pool) - left] if left else pool
        near = [c for c in pool if abs(prefix[c.position] - target) <= window]
        if near:
            best = min(near, key=lambda c: (c.bytes, len(c.tensors), abs(prefix[c.position] - target)))
        else:
            best = min(pool, key=lambda c: (abs(prefix[c.position] - target), c.bytes))
        chosen.append(best.position)
    return chosen


@register_pass
class SplitStages(Pass):
    """Partition into n contiguous stages of balanced cost, or the fewest that fit max_memory.

    Matches: the compute nodes in graph order; a cut between two nodes is
    splittable when every value crossing it is a tensor (or a symbolic size a
    crossing tensor carries), see ``graphopt.passlib.partition``. ``params``
    (weight bytes, at first use) and ``flops`` (2 per multiply-add of
    matmuls/attention, 1 per output element otherwise) are summed per node:
    each cut aims at an equal share and, within ``slack`` of it, takes the
    position crossing the fewest bytes. ``memory`` balances what each stage
    needs, weights + activation peak at ``batch``/``seq`` (0: the Program's
    example sizes), from the ``memory`` analysis (``graphopt.passlib.stage_memory``):
    the cuts whose largest stage need is least. ``max_memory`` (``2GB``,
    ``512MiB``; SI units are powers of 1000, IEC of 1024) picks ``n``: the
    fewest stages whose every stage fits (cut by ``balance`` when those cuts
    fit, else by memory), or fails naming the smallest per-stage need; leave
    ``n`` at its default with it. ``embeddings_stage`` first moves every
    embedding lookup (and its inputs) to the front and gives them a stage of
    their own. Produces: ``node.meta["graphopt.stage"]`` on every node and one
    ``StagePartition`` record (options, cut node names; read it with
    ``stage_partition(program)``), which the ``stages`` runtime lowers from;
    the graph itself is unchanged unless ``embeddings_stage`` reorders it.
    Per-stage details include each stage's memory need. Requires shapes;
    preserves shapes. Exact.
    Before/after: ``linear -> gelu -> linear`` -> the same, with stage 0 | 1.
    """

    name = "split-stages"
    options = (
        Option("n", int, 2, "number of stages", check=lambda v: None if v >= 1 else "must be at least 1"),
        Option("balance", str, "params", "cost to balance", choices=("params", "flops", "memory")),
        Option("embeddings_stage", bool, False, "put embedding lookups on a stage of their own"),
        Option(
            "slack",
            float,
            0.1,
            "allowed imbalance, as a fraction of one stage's share",
            check=lambda v: None if 0 <= v <= 1 else "must be within 0..1",
        ),
        Option("max_memory", str, "none", "most memory per stage (weights + activation peak), e.g. 2GB; "
               "picks the fewest stages that fit", check=_check_bytes),
        Option("batch", int, 0, "batch size memory is evaluated at (0: the Program's example)",
               check=lambda v: None if v >= 0 else "must be >= 0"),
        Option("seq", int, 0, "sequence length memory is evaluated at (0: the Program's example)",
               check=lambda v: None if v >= 0 else "must be >= 0"),
    )
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})
    backend_notes = "read by the stages runtime (runtimes/stages/); other runtimes ignore it"

    def validate(self) -> None:
        if self.max_memory != "none" and self.n != 2:
            raise PassOptionError("pass 'split-stages': max_memory picks the number of stages; drop n")
        if self.embeddings_stage and self.n < 2 and self.max_memory == "none":
            raise PassOptionError("pass 'split-stages': embeddings_stage=true needs n >= 2")

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm = program.gm
        budget = None if self.max_memory == "none" else parse_bytes(self.max_memory)
        if self.n == 1 and budget is None:
            return PassResult(program, modified=False, notes=["n=1: one stage, nothing to split"])
        first, moved = _embeddings_first(gm) if self.embeddings_stage else (0, False)
        if self.embeddings_stage and not first:
            raise PreconditionError(f"{program.name} has no embedding lookups; use embeddings_stage=false")
        order = compute_nodes(gm)
        cuts = cut_table(program)
        by_position = {c.position: c for c in cuts}
        if first and not by_position[first].splittable:
            raise PreconditionError(
                f"cannot cut {program.name} after its embedding lookups: {by_position[first].reason}"
            )
        needs = self._needs(program, ctx, moved, required=budget is not None or self.balance == "memory")
        notes: list[str] = []
        if budget is not None:
            positions = self._fit(program, needs, cuts, budget, first, notes)
            if not positions:
                notes.append(f"the whole Program fits in max_memory={self.max_memory}: one stage, nothing to split")
                return PassResult(program, modified=moved, notes=notes)
        else:
            positions = self._cuts(program, needs, cuts, self.n, first)
        n = len(positions) + 1
        partition = StagePartition(
            n=n,
            cuts=tuple(by_position[p].after for p in positions),
            balance=self.balance,
            embeddings_stage=self.embeddings_stage,
            slack=self.slack,
        )
        changed = self._annotate(gm, order, positions)
        changed = set_stage_partition(program, partition) or changed or moved
        details = self._details(program, order, positions, [by_position[p] for p in positions])
        if needs is not None:
            self._add_memory(details, needs, positions, notes, self.max_memory if budget is not None else None)
        notes = [f"cut after {name}" for name in partition.cuts] + notes
        shared = [d["shared_weights"] for d in details if d["shared_weights"]]
        if shared:
            notes.append(
                f"weights read by several stages are copied into each: {', '.join(sorted(set(sum(shared, []))))}"
            )
        return PassResult(
            program,
            modified=bool(changed),
            stats={"stages": n, "cuts": n - 1} if changed else {},
            details=details,
            notes=notes,
        )

    def _needs(self, program, ctx, moved: bool, required: bool) -> StageNeeds | None:  # type: ignore[no-untyped-def]
        """Per-position memory at the chosen shape (None, when only reported and not computable)."""
        try:  # reordering for embeddings_stage changed the graph the cached analysis saw
            analysis = analyze_memory(program) if moved else ctx.analyses.get("memory", program)
            return stage_needs(program, analysis, self.batch or None, self.seq or None)
        except Exception:
            if required:
                raise
            return None

    def _cuts(self, program, needs: StageNeeds | None, cuts: list[Cut], n: int, first: int) -> list[int]:  # type: ignore[no-untyped-def]
        """``n - 1`` cut positions balanced by ``self.balance`` (the first at ``first`` when set)."""
        splittable = [c for c in cuts if c.splittable and c.position >= first]
        if len(splittable) < n - 1:
            raise PreconditionError(
                f"n={n} stages need {n - 1} cut points but {program.name} has only "
                f"{len(splittable)} splittable points; use n <= {len(splittable) + 1}"
            )
        rest = n - 1 if first else n  # stages after the embeddings stage
        if self.balance == "memory":
            assert needs is not None
            valid = {c.position for c in splittable if c.position > first}
            chosen, _ = needs.balanced(first, rest, valid, first=first == 0)
        else:
            costs = _node_costs(program.gm, compute_nodes(program.gm), self.balance)
            chosen = _choose_cuts(cuts, costs, first, rest, self.slack)
        return [first, *chosen] if first else chosen

    def _fit(self, program, needs: StageNeeds, cuts: list[Cut], budget: int, first: int, notes: list[str]) -> list[int]:  # type: ignore[no-untyped-def]
        """The fewest stages that each fit ``budget``, cut by ``self.balance`` where that fits."""
        if first:
            head = sum(needs.need(0, first, True))
            if head > budget:
                raise PreconditionError(
                    f"{program.name}: its embeddings stage alone needs {format_bytes(head)} "
                    f"> max_memory={self.max_memory}; raise max_memory, quantize the tables, or use embeddings_stage=false"
                )
        found = fit_budget(needs, cuts, budget, first, program.name)
        positions = [first, *found] if first else found
        if not positions:
            return []
        balanced = self._cuts(program, needs, cuts, len(positions) + 1, first)
        if self.balance == "memory" or self._largest(needs, balanced) <= budget:
            return balanced  # memory: the least largest stage, within the budget since these n fit
        notes.append(f"the {self.balance}-balanced cuts exceed max_memory={self.max_memory}; cut by memory")
        return positions

    @staticmethod
    def _largest(needs: StageNeeds, positions: list[int]) -> int:
        bounds = [0, *positions, len(needs.order)]
        return max(sum(needs.need(a, b, k == 0)) for k, (a, b) in enumerate(zip(bounds, bounds[1:])))

    @staticmethod
    def _add_memory(details, needs: StageNeeds, positions, notes, budget) -> None:  # type: ignore[no-untyped-def]
        bounds = [0, *positions, len(needs.order)]
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            weights, peak = needs.need(a, b, k == 0)
            details[k]["activation_peak_bytes"] = peak
            details[k]["memory_bytes"] = weights + peak
        at = ", ".join(f"{key}={v}" for key, v in needs.sizes.items()) or "static shapes"
        per = ", ".join(format_bytes(d["memory_bytes"]) for d in details)
        limit = f" (max_memory={budget})" if budget is not None else ""
        notes.append(f"memory per stage at {at}: {per}{limit}")

    @staticmethod
    def _annotate(gm: torch.fx.GraphModule, order: list[torch.fx.Node], positions: list[int]) -> bool:
        """Write node.meta[STAGE_META]; return whether any value changed."""
        bounds = [0, *positions, len(order)]
        stage_of: dict[torch.fx.Node, int] = {}
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            for node in order[a:b]:
                stage_of[node] = k
        changed = False
        last = len(positions)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                stage = 0
            elif node.op == "output":
                stage = last
            elif node.op == "get_attr":
                stage = min((stage_of[u] for u in node.users if u in stage_of), default=0)
            else:
                stage = stage_of[node]
            changed |= node.meta.get(STAGE_META) != stage
            node.meta[STAGE_META] = stage
        return changed

    @staticmethod
    def _details(program, order, positions, cuts) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
        gm = program.gm
        bounds = [0, *positions, len(order)]
        readers: dict[str, set[int]] = {}
        rows = []
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            nodes = order[a:b]
            seen: set[int] = set()
            weights = sum(_weight_bytes(gm, n, seen) for n in nodes)
            for n in nodes:
                for arg in n.all_input_nodes:
                    if arg.op == "get_attr":
                        readers.setdefault(arg.target, set()).add(k)
            cut = cuts[k] if k < len(cuts) else None
            rows.append(
                {
                    "stage": k,
                    "nodes": len(nodes),
                    "first": nodes[0].name,
                    "last": nodes[-1].name,
                    "parameter_bytes": weights,
                    "flops": sum(node_flops(n) for n in nodes),
                    "sends": list(cut.tensors) if cut else [],
                    "send_bytes": cut.bytes if cut else 0,
                    "shared_weights": [],
                }
            )
        for target, stages in readers.items():
            if len(stages) > 1:
                for k in stages:
                    rows[k]["shared_weights"].append(target)
        return rows
