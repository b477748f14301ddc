"""split-stages: partition a Program into n contiguous stages (for the ``stages`` runtime)."""

from __future__ import annotations

from typing import Any

import torch

from graphopt.errors import PassOptionError, PreconditionError
from graphopt.ir.fx import fetch_attr, is_op
from graphopt.passlib.costs import node_flops, tensor_bytes
from graphopt.passlib.partition import (
    STAGE_META,
    Cut,
    StagePartition,
    compute_nodes,
    cut_table,
    set_stage_partition,
)
from graphopt.transform.base import Option, Pass, PassResult, register_pass

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
    seen: set[int] = set()
    costs = []
    for node in order:
        params = _weight_bytes(gm, node, seen)
        val = node.meta.get("val")
        if balance == "params":
            costs.append(params)
        elif balance == "flops":
            costs.append(node_flops(node))
        else:  # memory: weights plus the activation the node writes
            costs.append(params + (tensor_bytes(val) if isinstance(val, torch.Tensor) else 0))
    return costs


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
    """Partition the Program into n contiguous stages of balanced cost.

    Matches: the compute nodes in graph order; a cut between two nodes is
    splittable when every value crossing it is a tensor (or a symbolic size a
    crossing tensor carries), see ``graphopt.passlib.partition``. Cost per node is
    estimated from shape metadata: ``params`` (weight bytes, at first use),
    ``flops`` (2 per multiply-add of matmuls/attention, 1 per output element
    otherwise) or ``memory`` (weights + activation bytes). Each cut aims at an
    equal share of the cost and, within ``slack`` of it, takes the position
    crossing the fewest bytes. ``embeddings_stage`` first moves every embedding
    lookup (and its inputs) to the front and gives them a stage of their own.
    Produces: ``node.meta["graphopt.stage"]`` on every node and one
    ``StagePartition`` record (options, cut node names; read it with
    ``stage_partition(program)``), which the ``stages`` runtime lowers from;
    the graph itself is unchanged unless
    ``embeddings_stage`` reorders it. Requires shapes; preserves shapes. Exact.
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
    )
    requires = frozenset({"shapes"})
    preserves = frozenset({"shapes"})
    backend_notes = "read by the stages runtime (runtimes/stages/); other runtimes ignore it"

    def validate(self) -> None:
        if self.embeddings_stage and self.n < 2:
            raise PassOptionError("pass 'split-stages': embeddings_stage=true needs n >= 2")

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm = program.gm
        if self.n == 1:
            return PassResult(program, modified=False, notes=["n=1: one stage, nothing to split"])
        first, moved = _embeddings_first(gm) if self.embeddings_stage else (0, False)
        if self.embeddings_stage and not first:
            raise PreconditionError(f"{program.name} has no embedding lookups; use embeddings_stage=false")
        order = compute_nodes(gm)
        cuts = cut_table(program)
        splittable = [c for c in cuts if c.splittable and c.position >= first]
        needed = self.n - 1
        if len(splittable) < needed:
            raise PreconditionError(
                f"n={self.n} stages need {needed} cut points but {program.name} has only "
                f"{len(splittable)} splittable points; use n <= {len(splittable) + 1}"
            )
        by_position = {c.position: c for c in cuts}
        if first:
            if not by_position[first].splittable:
                raise PreconditionError(
                    f"cannot cut {program.name} after its embedding lookups: {by_position[first].reason}"
                )
            positions = [
                first,
                *_choose_cuts(cuts, _node_costs(gm, order, self.balance), first, needed, self.slack),
            ]
        else:
            positions = _choose_cuts(cuts, _node_costs(gm, order, self.balance), 0, self.n, self.slack)
        partition = StagePartition(
            n=self.n,
            cuts=tuple(by_position[p].after for p in positions),
            balance=self.balance,
            embeddings_stage=self.embeddings_stage,
            slack=self.slack,
        )
        changed = self._annotate(gm, order, positions)
        changed = set_stage_partition(program, partition) or changed or moved
        details = self._details(program, order, positions, [by_position[p] for p in positions])
        notes = [f"cut after {name}" for name in partition.cuts]
        shared = [d["shared_weights"] for d in details if d["shared_weights"]]
        if shared:
            notes.append(
                f"weights read by several stages are copied into each: {', '.join(sorted(set(sum(shared, []))))}"
            )
        return PassResult(
            program,
            modified=bool(changed),
            stats={"stages": self.n, "cuts": needed},
            details=details,
            notes=notes,
        )

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
