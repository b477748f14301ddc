"""The int8 guard's emulator: the float graph with each planned linear switchable to the
numerics the rewritten graph gives it (int8 QDQ, a bf16 GEMM, or fp32).

:class:`LayerPlan` is one layer's quantization; :class:`Emulator` scores any set of
layers in one forward pass without rewriting the graph, and
:meth:`Emulator.each_alone` the outputs with each layer int8 on its own, sharing the
float computation before each layer (what the guard's ranking needs: one float pass
plus, per layer, the graph from that layer on, instead of one whole pass per layer).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from graphopt.passlib.qdq import QD, WEIGHT_QMAX, WEIGHT_QMIN, QuantLinear

__all__ = ["LayerPlan", "Emulator"]


@dataclass
class LayerPlan:
    """One layer's quantization: activation ``qparams`` = (scale, zp, qmin, qmax),
    the observed range, and the int8 weight ``(q, scale, zero_point)``."""

    layer: QuantLinear
    qparams: tuple[float, int, int, int]
    act_range: tuple[float, float]
    weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    act_dtype: torch.dtype
    per_channel: bool
    bf16_out: bool = False  # int8-mixed-bf16: the GEMM reads bf16 operands and rounds its output to bf16

    def dequantized_weight(self) -> torch.Tensor:
        q, scale, zp = self.weight
        if not self.per_channel:
            return QD.dequantize_per_tensor(q, float(scale), int(zp), WEIGHT_QMIN, WEIGHT_QMAX, torch.int8)
        return QD.dequantize_per_channel(q, scale.float(), zp, 0, WEIGHT_QMIN, WEIGHT_QMAX, torch.int8)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        args = (*self.qparams, self.act_dtype)
        return QD.dequantize_per_tensor(QD.quantize_per_tensor(x, *args), *args)


class _Switched(torch.nn.Module):
    """A linear computed as the rewritten graph computes it in ``mode``: ``int8`` (the QDQ
    form), ``bf16`` (a bf16 GEMM on its bf16 weight: int8-mixed-bf16's kept layers) or ``fp32``."""

    def __init__(self, plan: LayerPlan):
        super().__init__()
        self.plan, self.mode = plan, "fp32"
        self.weight_dq = plan.dequantized_weight()

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "int8":
            x, weight = self.plan.fake_quant(x), self.weight_dq
        # int8-mixed-bf16 runs an int8 layer as a bf16 GEMM on bf16 dequantized operands, and a kept
        # layer either so on its bf16 weight or in fp32; attention after them also runs bf16 there,
        # which :func:`confirm` checks on the rewritten Program
        if self.mode != "fp32" and self.plan.bf16_out:
            low = torch.bfloat16
            bias = bias.to(low) if bias is not None else None
            return torch.nn.functional.linear(x.to(low), weight.to(low), bias).float()
        return torch.nn.functional.linear(x, weight, bias)


class Emulator:
    """The float graph with every planned layer switchable to its QDQ numerics.

    A copy of the graph (sharing the weights) where each planned ``linear`` calls
    a switch module; :meth:`run` sets the switches and runs it as generated
    Python, so scoring a subset of layers costs one forward pass.
    """

    def __init__(self, gm: torch.fx.GraphModule, plans: dict[str, LayerPlan]):
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        graph.output(graph.graph_copy(gm.graph, env))
        self.module = torch.fx.GraphModule(gm, graph)
        self.switches: dict[str, _Switched] = {}
        self._calls: dict[str, torch.fx.Node] = {}
        by_name = {n.name: n for n in gm.graph.nodes}
        for i, (name, plan) in enumerate(plans.items()):
            node = env[by_name[name]]
            switch = _Switched(plan)
            target = f"_graphopt_switch_{i}"
            self.module.add_submodule(target, switch)
            self.switches[name] = switch
            with graph.inserting_before(node):
                call = graph.call_module(target, node.args, node.kwargs)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            self._calls[name] = call
        self.module.recompile()

    def run(self, enabled: set[str], *inputs: torch.Tensor, bf16: Set[str] = frozenset()) -> Any:
        """Outputs with the ``enabled`` layers int8, the ``bf16`` ones bf16 GEMMs (int8-mixed-bf16
        only), the rest fp32; ``run(set())`` is the float model."""
        for name, switch in self.switches.items():
            switch.mode = "int8" if name in enabled else "bf16" if name in bf16 else "fp32"
        with torch.no_grad():
            return self.module(*inputs)

    def each_alone(self, names: Sequence[str], *inputs: torch.Tensor) -> Iterator[tuple[str, Any]]:
        """``(name, outputs)`` for each of ``names`` with that layer alone int8, the rest fp32: what
        ``run({name}, *inputs)`` returns, computed exactly so (the same ops on the same values), but
        the float graph is run once and each layer's pass starts at that layer from the float values
        still in use there. Costs one float pass plus, per layer, the graph from it on: about half
        the passes of one ``run`` per layer when the layers are spread through the model."""
        nodes = list(self.module.graph.nodes)
        at = {node: i for i, node in enumerate(nodes)}
        last_use = {node: max((at[u] for u in node.users), default=at[node]) for node in nodes}
        walker = torch.fx.Interpreter(self.module, garbage_collect_values=False)
        placeholders = iter(inputs)
        env: dict[torch.fx.Node, Any] = {}
        done = 0  # nodes[:done] have float values in env (those still read later)

        def compute(values: dict[torch.fx.Node, Any], i: int) -> Any:
            node = nodes[i]
            walker.env = values
            value = next(placeholders) if node.op == "placeholder" else walker.run_node(node)
            values[node] = value
            for arg in node.all_input_nodes:  # free what no later node reads
                if last_use[arg] == i:
                    del values[arg]
            return value

        for name in sorted(names, key=lambda n: at[self._calls[n]]):
            start = at[self._calls[name]]
            for switch in self.switches.values():  # every resume: the caller may have run other modes
                switch.mode = "fp32"
            switch = self.switches[name]
            with torch.no_grad():  # not around the yield: the caller's grad mode stays its own
                while done < start:
                    compute(env, done)
                    done += 1
                switch.mode = "int8"
                try:
                    values = dict(env)
                    out = None
                    for i in range(start, len(nodes)):
                        out = compute(values, i)
                finally:
                    switch.mode = "fp32"
            yield name, out
