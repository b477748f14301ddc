"""Derive ``prefill`` and ``step`` Programs from a captured causal Program.

A graph transformation, not a second model: both come from the one Program
(:func:`graphopt.passlib.incremental.analysis.analyze` says where to cut).

``prefill(ids, mask) -> (scores, length, key_0, value_0, ...)``
    The Program with every attention's mask replaced by the sliding window
    of width ``window`` over real events (:func:`kernels.window_mask`), and
    each attention's keys/values of the last ``window`` events exposed as
    state outputs (padding zeroed, left-filled when the history is shorter).
    ``length`` is the number of real events per user.

``step(ids, past_length, past_key_0, past_value_0, ...) -> (scores, length, key_0, ...)``
    The same graph over only the new events (all real; the mask input
    becomes ones): each attention reads the cached keys/values concatenated
    with the new ones under the same window, the running counts (positions)
    continue from ``past_length``, and the next state is the last ``window``
    events. Everything else in the graph is per event and runs on the new
    events only.

Both are re-captured with ``torch.export`` (the inserted functions trace to
plain aten ops), so every runtime lowers them like any Program.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt.errors import PreconditionError
from graphopt.ir.fx import is_op, tensor_meta
from graphopt.ir.program import InputSpec, Program
from graphopt.ir.shapes import fill_vals
from graphopt.passlib.incremental import kernels
from graphopt.passlib.incremental.analysis import Attention, CausalPlan

__all__ = ["StateSpec", "IncrementalPrograms", "state_names", "state_specs", "rewrite_prefill", "rewrite_step"]

log = logging.getLogger(__name__)

aten = torch.ops.aten


@dataclass
class StateSpec:
    """One state tensor: its name, dtype and shape after the batch dim."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": str(self.dtype).replace("torch.", ""), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StateSpec:
        return cls(d["name"], getattr(torch, d["dtype"]), tuple(d["shape"]))


@dataclass
class IncrementalPrograms:
    """The derived entry points of one causal Program and what their state holds."""

    prefill: Program
    step: Program
    window: int
    codec: str
    scores: list[str]
    state: list[StateSpec] = field(default_factory=list)
    max_positions: int | None = None

    def state_bytes(self) -> int:
        """Bytes of state per user."""
        total = 0
        for s in self.state:
            n = 1
            for d in s.shape:
                n *= d
            total += n * torch.empty((), dtype=s.dtype).element_size()
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "max_history": self.window,
            "state_dtype": self.codec,
            "scores": list(self.scores),
            "state": [s.to_json() for s in self.state],
            "state_bytes_per_user": self.state_bytes(),
            "max_positions": self.max_positions,
            "semantics": "sliding-window attention of width max_history over each user's whole history; "
                         "positions count from the user's first event",
        }


def state_names(n_layers: int, codec: str) -> list[str]:
    """``length`` then each attention's stored blocks, in graph order."""
    parts = ("", "_scale") if codec == "int8" else ("",)
    names = ["length"]
    for i in range(n_layers):
        names += [f"key_{i}{p}" for p in parts] + [f"value_{i}{p}" for p in parts]
    return names


def _plain_copy(program: Program) -> torch.fx.GraphModule:
    """A deep copy with positional codegen, without the export guard and metadata asserts."""
    gm = copy.deepcopy(program.gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and "guards" in str(node.target) and not node.users:
            gm.graph.erase_node(node)
        elif is_op(node, aten._assert_tensor_metadata.default) and not node.users:
            gm.graph.erase_node(node)
    gm.graph._codegen = torch.fx.graph.CodeGen()
    return gm.eval()


def _find(gm: torch.fx.GraphModule, original: torch.fx.Node) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == original.name)


def _outputs(gm: torch.fx.GraphModule) -> tuple[torch.fx.Node, list[Any]]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat, _ = torch.utils._pytree.tree_flatten(out.args[0])
    return out, flat


def _replace_attention(gm: torch.fx.GraphModule, attention: Attention, fn: Callable[..., Any],
                       extra: tuple[Any, ...], n_state: int) -> list[torch.fx.Node]:
    """``sdpa(q, k, v, ...)`` -> ``fn(q, k, v, *extra)[0]``; returns the state getitems."""
    node = _find(gm, attention.node)
    q, k, v = node.args[0], node.args[1], node.args[2]
    with gm.graph.inserting_before(node):
        call = gm.graph.call_function(fn, (q, k, v, *extra))
        items = [gm.graph.call_function(operator.getitem, (call, i)) for i in range(1 + n_state)]
    items[0].meta = dict(node.meta)
    node.replace_all_uses_with(items[0])
    gm.graph.erase_node(node)
    return items[1:]


def _finish(gm: torch.fx.GraphModule, outputs: list[torch.fx.Node]) -> None:
    out, _ = _outputs(gm)
    out.args = (tuple(outputs),)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def _program(program: Program, gm: torch.fx.GraphModule, suffix: str, inputs: list[InputSpec],
             outputs: list[str], example: tuple[torch.Tensor, ...]) -> Program:
    """The rewritten graph as a Program; new nodes get ``meta["val"]`` (fake tensors with the
    original symbolic sizes: the step's new events reuse the history's seq symbol)."""
    fill_vals(gm.graph, [n for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta])
    gm.recompile()
    derived = Program(gm, inputs, outputs, name=f"{program.name}.{suffix}", example_inputs=example,
                      pipeline=program.pipeline, meta=dict(program.meta))
    return derived


def _placeholder(graph: torch.fx.Graph, after: torch.fx.Node, name: str, like: torch.fx.Node,
                 spec: StateSpec) -> torch.fx.Node:
    """A new input ``(batch, *spec.shape)`` whose batch is ``like``'s (symbolic) batch."""
    val = like.meta["val"]
    with graph.inserting_after(after):
        node = graph.placeholder(name)
    with val.fake_mode:
        node.meta["val"] = torch.empty((val.shape[0], *spec.shape), dtype=spec.dtype)
    return node


def state_specs(plan: CausalPlan, window: int, codec: str) -> list[StateSpec]:
    """The state's tensors after the batch dim: ``length`` then each attention's blocks."""
    specs = [StateSpec("length", torch.int64, ())]
    names = iter(state_names(len(plan.attentions), codec)[1:])
    for attention in plan.attentions:
        block = (attention.heads, window, attention.head_dim)
        for _ in ("key", "value"):
            if codec == "int8":
                specs.append(StateSpec(next(names), torch.int8, block))
                specs.append(StateSpec(next(names), torch.float32, (*block[:2], 1)))
            else:
                dtype = torch.bfloat16 if codec == "bf16" else attention.dtype
                specs.append(StateSpec(next(names), dtype, block))
    return specs


def _check_no_positions_from_arange(program: Program, gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if is_op(node, aten.arange.default, aten.arange.start, aten.arange.start_step):
            val = tensor_meta(node)
            if val is not None and not isinstance(val.shape[0], int):
                raise PreconditionError(
                    f"incremental state for {program.name}: {node.name} counts positions with arange over the "
                    "padded sequence; pass position ids computed from the mask (cumsum(mask) - 1, as gpt-rec does)")


def rewrite_prefill(program: Program, plan: CausalPlan, window: int, codec: str,
                    example: tuple[torch.Tensor, torch.Tensor]) -> Program:
    """The prefill Program (see the module docstring)."""
    gm = _plain_copy(program)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mask = next(n for n in placeholders if n.name == plan.mask)
    parts = 2 if codec == "int8" else 1
    with gm.graph.inserting_after(placeholders[-1]):
        valid = gm.graph.call_function(torch.ne, (mask, 0))
    with gm.graph.inserting_after(valid):
        length = gm.graph.call_function(torch.sum, (mask,), {"dim": -1, "dtype": torch.int64})
    state: list[torch.fx.Node] = [length]
    for attention in plan.attentions:
        state += _replace_attention(gm, attention, kernels.prefill_attention,
                                    (valid, window, codec, attention.sdpa_kwargs()), 2 * parts)
    _, scores = _outputs(gm)
    _finish(gm, [*scores, *state])
    names = [*program.output_names, *state_names(len(plan.attentions), codec)]
    return _program(program, gm, "prefill", list(program.inputs), names, example)


def rewrite_step(program: Program, plan: CausalPlan, window: int, codec: str,
                 example: tuple[torch.Tensor, ...]) -> Program:
    """The step Program (see the module docstring); ``example``: its inputs (ids, then the state)."""
    gm = _plain_copy(program)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    ids_ph = next(n for n in placeholders if n.name == plan.ids)
    mask_ph = next(n for n in placeholders if n.name == plan.mask)
    specs = state_specs(plan, window, codec)
    past: dict[str, torch.fx.Node] = {}
    last = placeholders[-1]
    for spec in specs:
        last = past[spec.name] = _placeholder(graph, last, f"past_{spec.name}", ids_ph, spec)
    mask_dtype = next(s.dtype for s in program.inputs if s.name == plan.mask)
    with graph.inserting_after(last):
        valid = graph.call_function(kernels.step_key_valid, (past["length"], ids_ph, window))
    with graph.inserting_after(last):
        ones = graph.call_function(torch.ones_like, (ids_ph,), {"dtype": mask_dtype})
    mask_ph.replace_all_uses_with(ones)
    graph.erase_node(mask_ph)
    for count in plan.counts:
        node = _find(gm, count)
        with graph.inserting_after(node):
            offset = graph.call_function(kernels.offset_positions, (node, past["length"]))
        node.replace_all_uses_with(offset, delete_user_cb=lambda user, o=offset: user is not o)
    parts = 2 if codec == "int8" else 1
    names = [s.name for s in specs]
    next_state: list[torch.fx.Node] = []
    for i, attention in enumerate(plan.attentions):
        cached = [past[n] for n in names[1 + 2 * parts * i: 1 + 2 * parts * (i + 1)]]
        extra = (valid, tuple(cached[:parts]), tuple(cached[parts:]), window, codec, attention.sdpa_kwargs())
        next_state += _replace_attention(gm, attention, kernels.step_attention, extra, 2 * parts)
    out, scores = _outputs(gm)
    with graph.inserting_before(out):
        length = graph.call_function(kernels.advance, (past["length"], ids_ph))
    _finish(gm, [*scores, length, *next_state])
    _check_no_positions_from_arange(program, gm)
    ids_spec = next(s for s in program.inputs if s.name == plan.ids)
    inputs = [InputSpec(plan.ids, ids_spec.dtype, tuple(example[0].shape), {0: "batch", 1: "new"}, ids_spec.low,
                        ids_spec.high)]
    for spec, value in zip(specs, example[1:]):
        low, high = (0, window + 1) if spec.name == "length" else (None, None)
        inputs.append(InputSpec(f"past_{spec.name}", spec.dtype, tuple(value.shape), {0: "batch"}, low, high))
    return _program(program, gm, "step", inputs, [*program.output_names, *names], example)
