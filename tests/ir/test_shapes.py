"""infer_val / fill_vals: one node's meta["val"] from its inputs, under the graph's fake mode."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import graphopt
from graphopt.errors import GraphoptError
from graphopt.ir.fx import add_tensor_attr
from graphopt.ir.shapes import fill_vals, graph_fake_mode, infer_val

aten = torch.ops.aten


class Scale(torch.nn.Module):
    def forward(self, x):
        return x * 3


def _program():
    return graphopt.capture(Scale(), torch.randn(4, 6))  # both dims symbolic


def test_symbolic_shape_from_fake_inputs():
    prog = _program()
    graph = prog.graph
    x = next(n for n in graph.nodes if n.op == "placeholder")
    mul = next(n for n in graph.nodes if n.target is aten.mul.Tensor)
    with graph.inserting_after(mul):
        node = graph.call_function(aten.sum.dim_IntList, (mul, [1]))
    assert infer_val(node)
    val = node.meta["val"]
    assert isinstance(val, FakeTensor) and val.fake_mode is graph_fake_mode(graph)
    assert val.shape == x.meta["val"].shape[:1]  # the symbolic batch dim, not 4


def test_real_constants_only_borrow_the_graphs_fake_mode():
    prog = _program()
    graph = prog.graph
    mul = next(n for n in graph.nodes if n.target is aten.mul.Tensor)
    const = add_tensor_attr(prog.gm, "table", torch.arange(12, dtype=torch.int8).reshape(3, 4), before=mul)
    bare = add_tensor_attr(prog.gm, "bias", torch.ones(4), before=mul)
    del bare.meta["val"]  # a get_attr without metadata: its tensor is read from the module
    with graph.inserting_before(mul):
        node = graph.call_function(aten.add.Tensor, (const, bare))
    assert infer_val(node)
    val = node.meta["val"]
    assert isinstance(val, FakeTensor) and val.fake_mode is graph_fake_mode(graph)
    assert tuple(val.shape) == (3, 4) and val.dtype == torch.float32


def test_missing_input_value_leaves_meta_alone_and_fill_vals_names_the_node():
    prog = _program()
    graph = prog.graph
    mul = next(n for n in graph.nodes if n.target is aten.mul.Tensor)
    with graph.inserting_after(mul):
        a = graph.call_function(aten.neg.default, (mul,))
    with graph.inserting_after(a):
        b = graph.call_function(aten.neg.default, (a,))
    assert infer_val(b) is False and "val" not in b.meta  # its input has no value yet
    fill_vals(graph, [b, a])  # graph order: a first, then b
    assert b.meta["val"].shape == mul.meta["val"].shape
    del mul.meta["val"]
    with graph.inserting_after(b):
        c = graph.call_function(aten.neg.default, (mul,))
    with pytest.raises(GraphoptError, match=f"{c.name}: could not infer its shape"):
        fill_vals(graph, [c])
