"""Stage partitioning: where a Program can be cut, and cutting it into stage Programs.

A Program's compute nodes (everything but placeholders, ``get_attr`` and the
output) are taken in graph order; cut position ``p`` puts ``order[:p]`` in the
earlier stage and ``order[p:]`` in the later one. The values *crossing* a cut
are those defined before it (inputs included) and used after it. A cut is
splittable when every crossing value is either a tensor whose sizes are
constants or plain symbols (a derived size such as ``3*s0`` would make
torch.export guard the re-exported stage to ``>= 6``, refusing micro-batches
of 1), or a symbolic size the later stage can recompute from the crossing
tensors' shapes (``aten.sym_size``, then ``+``/``*``): the ``stages`` runtime
sends tensors only. Parameters never cross: each stage gets its own ``get_attr`` of
every weight it reads (tied weights are duplicated).

``split_program(program, cuts)`` builds one Program per stage: stage 0 takes
the Program's inputs, stage k>0 the tensors crossing cut k-1, and the last
stage returns the Program's outputs, so running the stages in sequence equals
running the Program.

The partition the ``split-stages`` pass chose is one :class:`StagePartition`
record, written with :func:`set_stage_partition` and read with
:func:`stage_partition`; it is stored as JSON in ``program.meta`` so it
survives ``Program.copy`` and save/load.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt.errors import PreconditionError
from graphopt.ir.program import InputSpec, Program
from graphopt.passlib.costs import hint_shape, tensor_bytes

__all__ = [
    "STAGE_META",
    "StagePartition",
    "stage_partition",
    "set_stage_partition",
    "Cut",
    "compute_nodes",
    "cut_table",
    "split_program",
    "run_stages",
]

log = logging.getLogger(__name__)

#: per-node stage index, set by the split-stages pass
STAGE_META = "graphopt.stage"
#: key in ``program.meta`` holding the StagePartition (as JSON); read and
#: written only through stage_partition / set_stage_partition
_PARTITION_KEY = "graphopt.stages"

aten = torch.ops.aten


@dataclass
class Cut:
    """One candidate cut position and what would cross it."""

    position: int
    after: str  # name of the last node of the earlier stage
    tensors: list[str] = field(default_factory=list)
    sizes: list[str] = field(default_factory=list)  # symbolic sizes re-derived after the cut
    bytes: int = 0
    reason: str = ""  # why it is not splittable ('' when it is)

    @property
    def splittable(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class StagePartition:
    """The partition split-stages chose: ``n`` contiguous stages, cut after the
    compute nodes named in ``cuts`` (``n - 1`` names in graph order), and the
    options it balanced with."""

    n: int
    cuts: tuple[str, ...]
    balance: str = "params"
    embeddings_stage: bool = False
    slack: float = 0.1

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "cuts": list(self.cuts),
            "balance": self.balance,
            "embeddings_stage": self.embeddings_stage,
            "slack": self.slack,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StagePartition:
        return cls(
            n=int(data["n"]),
            cuts=tuple(data["cuts"]),
            balance=str(data.get("balance", "params")),
            embeddings_stage=bool(data.get("embeddings_stage", False)),
            slack=float(data.get("slack", 0.1)),
        )

    def positions(self, program: Program) -> list[int]:
        """Cut positions of this partition in ``program``'s compute order.

        Raises PreconditionError when the graph no longer holds the cut nodes
        in order (a pass after split-stages rewrote them).
        """
        index = {node.name: i for i, node in enumerate(compute_nodes(program.gm))}
        missing = [name for name in self.cuts if name not in index]
        positions = [index[name] + 1 for name in self.cuts if name in index]
        if missing or positions != sorted(set(positions)) or len(positions) != self.n - 1:
            gone = f" (node {missing[0]} is gone)" if missing else ""
            raise PreconditionError(
                f"{program.name}: the split-stages partition no longer fits the graph{gone}; "
                f"run 'split-stages{{n={self.n}}}' after the passes that rewrite it"
            )
        return positions


def stage_partition(program: Program) -> StagePartition | None:
    """The partition split-stages recorded on ``program``, or None."""
    data = program.meta.get(_PARTITION_KEY)
    return StagePartition.from_json(data) if data else None


def set_stage_partition(program: Program, partition: StagePartition) -> bool:
    """Record ``partition`` on ``program``; return whether that changed it."""
    changed = stage_partition(program) != partition
    program.meta[_PARTITION_KEY] = partition.to_json()
    return changed


def compute_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes that do work, in graph order (no placeholders, get_attr, output)."""
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")]


def _expr(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else None


def _symbol_sources(tensors: Sequence[torch.fx.Node]) -> dict[Any, tuple[torch.fx.Node, int]]:
    """Symbol -> the first (tensor, dim) among ``tensors`` whose size is that symbol."""
    out: dict[Any, tuple[torch.fx.Node, int]] = {}
    for t in tensors:
        for dim, size in enumerate(t.meta["val"].shape):
            expr = _expr(size)
            if expr is not None and expr.is_Symbol:
                out.setdefault(expr, (t, dim))
    return out


def _rebuildable(expr: Any, sources: dict[Any, tuple[torch.fx.Node, int]]) -> bool:
    """Whether ``expr`` is a sum/product of integers and symbols found in ``sources``."""
    if expr.is_Integer or expr.is_Symbol:
        return not expr.is_Symbol or expr in sources
    if expr.is_Add or expr.is_Mul:
        return all(_rebuildable(a, sources) for a in expr.args)
    return False


def _rebuild(graph: torch.fx.Graph, expr: Any, sources: dict[Any, torch.fx.Node]) -> Any:
    """Emit nodes computing ``expr`` from the sym_size nodes in ``sources``."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return sources[expr]
    op = operator.add if expr.is_Add else operator.mul
    args = [_rebuild(graph, a, sources) for a in expr.args]
    value = args[0]
    for arg in args[1:]:
        value = graph.call_function(op, (value, arg))
    return value


def _live_ranges(
    gm: torch.fx.GraphModule,
) -> tuple[list[torch.fx.Node], list[tuple[torch.fx.Node, int, int]]]:
    """Compute order, and (value, def index, last use index) for every value
    that is not a parameter; placeholders are defined at -1, the output uses at N."""
    order = compute_nodes(gm)
    index = {n: i for i, n in enumerate(order)}
    n_nodes = len(order)
    ranges = []
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "output") or not node.users:
            continue
        first = index.get(node, -1)
        last = max(index.get(u, n_nodes) for u in node.users)
        ranges.append((node, first, last))
    return order, ranges


def _crossing(ranges: list[tuple[torch.fx.Node, int, int]], position: int) -> list[torch.fx.Node]:
    return [v for v, first, last in ranges if first < position <= last]


def _describe_cut(position: int, after: torch.fx.Node, crossing: list[torch.fx.Node]) -> Cut:
    cut = Cut(position=position, after=after.name)
    tensors = [v for v in crossing if isinstance(v.meta.get("val"), torch.Tensor)]
    for v in crossing:
        val = v.meta.get("val")
        if isinstance(val, torch.Tensor):
            cut.tensors.append(v.name)
            cut.bytes += tensor_bytes(val)
            derived = [str(_expr(s)) for s in val.shape if _expr(s) is not None and not _expr(s).is_Symbol]
            if derived:  # torch.export cannot re-export such an input for micro-batches of 1
                cut.reason = f"{v.name} has a derived size ({derived[0]})"
        elif isinstance(val, torch.SymInt):
            if not _rebuildable(_expr(val), _symbol_sources(tensors)):
                cut.reason = f"size {v.name} ({_expr(val)}) is not computable from crossing tensors' shapes"
            cut.sizes.append(v.name)
        else:
            kind = type(val).__name__ if val is not None else "a value without shape metadata"
            cut.reason = f"{v.name} is {kind}, not a tensor"
    return cut


def cut_table(program: Program) -> list[Cut]:
    """Every cut position 1..N-1 of ``program`` with its crossing tensors and bytes."""
    order, ranges = _live_ranges(program.gm)
    return [_describe_cut(p, order[p - 1], _crossing(ranges, p)) for p in range(1, len(order))]


def _input_labels(program: Program) -> dict[Any, str]:
    """Symbol -> dynamic label ('batch', 'seq') from the Program's inputs."""
    labels: dict[Any, str] = {}
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    for spec, node in zip(program.inputs, placeholders):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for dim, label in spec.dynamic.items():
            if dim < val.dim() and _expr(val.shape[dim]) is not None:
                labels.setdefault(_expr(val.shape[dim]), label)
    return labels


def _spec_for(node: torch.fx.Node, labels: dict[Any, str]) -> InputSpec:
    val = node.meta["val"]
    dynamic = {
        dim: labels.get(_expr(size), str(_expr(size)))
        for dim, size in enumerate(val.shape)
        if _expr(size) is not None
    }
    return InputSpec(node.name, val.dtype, tuple(hint_shape(val)), dynamic)


def _stage_graph(
    gm: torch.fx.GraphModule,
    nodes: Sequence[torch.fx.Node],
    inputs: Sequence[torch.fx.Node],
    sizes: Sequence[torch.fx.Node],
    outputs: Sequence[torch.fx.Node] | None,
    final_output: torch.fx.Node | None,
) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for v in inputs:
        ph = graph.placeholder(v.name)
        ph.meta = copy.copy(v.meta)
        env[v] = ph
    symbols: dict[Any, torch.fx.Node] = {}
    for symbol, (src, dim) in _symbol_sources(inputs).items():
        if any(symbol in s.meta["val"].node.expr.free_symbols for s in sizes):
            node = graph.call_function(aten.sym_size.int, (env[src], dim))
            node.meta["val"] = src.meta["val"].shape[dim]
            symbols[symbol] = node
    for s in sizes:  # symbolic sizes come back from the shapes of received tensors
        value = _rebuild(graph, s.meta["val"].node.expr, symbols)
        assert isinstance(value, torch.fx.Node), f"size {s.name} is a constant"
        value.meta.setdefault("val", s.meta["val"])
        env[s] = value

    def lookup(arg: torch.fx.Node) -> torch.fx.Node:
        if arg not in env and arg.op == "get_attr":  # each stage holds its own weights
            new = graph.get_attr(arg.target)
            new.meta = copy.copy(arg.meta)
            env[arg] = new
        return env[arg]

    for node in nodes:
        env[node] = graph.node_copy(node, lookup)
    if final_output is not None:
        graph.output(torch.fx.map_arg(final_output.args[0], lookup))
    else:
        graph.output(tuple(env[v] for v in outputs or ()))
    stage = torch.fx.GraphModule(gm, graph)
    stage.graph.lint()
    return stage


def run_stages(stages: Sequence[Program], inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Run stage Programs one after another (the single-process reference)."""
    values: tuple[torch.Tensor, ...] = tuple(inputs)
    for stage in stages:
        with torch.no_grad():
            out = stage.gm(*values)
        values = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return values


def split_program(program: Program, cuts: Sequence[int]) -> list[Program]:
    """Cut ``program`` at compute-node positions ``cuts`` (increasing) into
    ``len(cuts) + 1`` stage Programs whose sequence equals the Program."""
    gm = program.gm
    order, ranges = _live_ranges(gm)
    bounds = [0, *cuts, len(order)]
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise PreconditionError(
            f"{program.name}: stage cuts {list(cuts)} must increase strictly within 1..{len(order) - 1}"
        )
    labels = _input_labels(program)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    final_output = next(n for n in gm.graph.nodes if n.op == "output")
    crossing = [placeholders] + [_crossing(ranges, p) for p in cuts]
    tensors_at = [[v for v in c if isinstance(v.meta.get("val"), torch.Tensor)] for c in crossing]
    for p, c in zip(cuts, crossing[1:]):
        cut = _describe_cut(p, order[p - 1], c)
        if not cut.splittable:
            raise PreconditionError(f"{program.name}: cannot cut after node {cut.after}: {cut.reason}")
    n_stages = len(bounds) - 1
    example = program.sample_inputs()
    stages: list[Program] = []
    for k in range(n_stages):
        last = k == n_stages - 1
        inputs = tensors_at[k]
        sizes = [v for v in crossing[k] if isinstance(v.meta.get("val"), torch.SymInt)] if k else []
        stage_gm = _stage_graph(
            gm,
            order[bounds[k] : bounds[k + 1]],
            inputs,
            sizes,
            None if last else tensors_at[k + 1],
            final_output if last else None,
        )
        out_names = list(program.output_names) if last else [v.name for v in tensors_at[k + 1]]
        specs = list(program.inputs) if k == 0 else [_spec_for(v, labels) for v in inputs]
        stage = Program(
            stage_gm,
            specs,
            out_names,
            name=f"{program.name}.stage{k}",
            example_inputs=tuple(t.contiguous() for t in example),
            pipeline=program.pipeline,
            meta={"graphopt.stage": {"index": k, "of": n_stages, "source": program.name}},
        )
        stages.append(stage)
        example = run_stages([stage], example)
    log.info("split %s into %d stages at %s", program.name, n_stages, list(cuts))
    return stages
