"""The memory analysis: hand-built graphs with peaks computed by hand, symbolic
shapes, dtype-aware weights, and the prediction against the allocations a real
eager run makes (torch profiler).

Tolerances: the predicted peaks of the hand-built graphs are exactly the hand
computation; against the profiler they agree within 16 bytes (the 0-dim tensors
the dispatcher wraps Python scalars in, e.g. the 2 of ``x * 2``). The zoo models are held to 5% of the measured peak (the issue's target
is 20%; the model is byte-exact here on torch 2.13, the margin is for kernels
that allocate scratch differently in another torch build)."""

from __future__ import annotations

import pytest
import sympy
import torch

import graphopt
from graphopt.bench.memory import allocations_by_node, measure_allocations
from graphopt.ir.shapes import infer_val
from graphopt.transform.analysis import AnalysisManager
from graphopt.transform.memory import analyze_memory, dtype_bits, format_bytes, parse_bytes

aten = torch.ops.aten
B, S = sympy.Symbol("batch", positive=True, integer=True), sympy.Symbol("seq", positive=True, integer=True)


def _capture(module: torch.nn.Module, *shape: int, seq: bool = False):
    x = torch.randn(*shape)
    dynamic = {"x": {0: "batch", **({1: "seq"} if seq else {})}}
    return graphopt.capture(module.eval(), {"x": x}, dynamic=dynamic, name=type(module).__name__)


def _measured(program, **sizes) -> int:
    return measure_allocations(program.gm, program.sample_inputs(**sizes))["peak_bytes"]


def _near(measured: int, predicted: int) -> bool:
    return abs(measured - predicted) <= 16  # wrapped Python scalars


class Chain(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2 + 1


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 32)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h)) + h


class NoResidual(Residual):
    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class ViewKeepsBase(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        v = y.view(x.shape[0], 8, 8)  # a view: no allocation, but y lives as long as v
        u = (x + 1) * 3
        return u + v.reshape(x.shape[0], 64)


class Attention(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x @ x.transpose(1, 2), dim=-1) @ x


def test_chain_peak_is_two_live_buffers():
    p = _capture(Chain(), 4, 16)
    a = analyze_memory(p)
    # relu (64B) -> mul (64B, relu dies after) -> add (64B): at most two live, 128 bytes per row
    assert a.peak_expr == 128 * B
    assert [a.at(batch=b).activations for b in (3, 10)] == [384, 1280]
    assert a.at(batch=3).inputs == 3 * 16 * 4 and a.at(batch=3).outputs == 3 * 16 * 4
    assert _near(_measured(p, batch=10), 1280)


def test_residual_keeps_its_branch_alive():
    p = _capture(Residual(), 4, 8)
    a = analyze_memory(p)
    # h (128B) lives to the add: at b = linear(relu(h)), h + relu + b are live: 384 bytes per row
    assert a.peak_expr == 384 * B
    assert a.at(batch=5).activations == 1920 and _near(_measured(p, batch=5), 1920)
    largest = {t["node"] for t in a.at(batch=5).largest}
    assert {"linear", "relu", "linear_1"} <= largest  # the three live at the peak, named by their nodes
    # near miss: without the skip, h dies after relu: 256 per row
    assert analyze_memory(_capture(NoResidual(), 4, 8)).peak_expr == 256 * B


def test_views_alias_their_base_and_extend_its_life():
    p = _capture(ViewKeepsBase(), 4, 64)
    ops = [str(n.target) for n in p.gm.graph.nodes if n.op == "call_function"]
    assert "aten.view.default" in ops
    a = analyze_memory(p)
    # y (256B) stays alive through v; x+1 and *3 overlap it; the final add too: 3 x 256 per row.
    # Counting the view as an allocation would give 1024; freeing y at the view, 512.
    assert a.peak_expr == 768 * B
    assert a.at(batch=6).activations == 6 * 768 and _near(_measured(p, batch=6), 6 * 768)


def test_in_place_op_writes_into_its_input():
    p = _capture(Chain(), 4, 16)
    relu = next(n for n in p.gm.graph.nodes if n.target is aten.relu.default)
    before = analyze_memory(p).at(batch=4).activations
    with p.gm.graph.inserting_before(relu):  # a pass that computes relu in place on a fresh copy
        copy = p.gm.graph.call_function(aten.clone.default, (relu.args[0],))
        inplace = p.gm.graph.call_function(aten.relu_.default, (copy,))
    relu.replace_all_uses_with(inplace)
    p.gm.graph.erase_node(relu)
    infer_val(copy)
    infer_val(inplace)
    p.gm.graph.lint()
    p.gm.recompile()
    a = analyze_memory(p)
    assert a.at(batch=4).activations == before  # the clone allocates, relu_ does not
    assert not [b for b in a.buffers if b.node == inplace.name]
    assert _near(_measured(p, batch=4), a.at(batch=4).activations)


def test_symbolic_peak_in_batch_and_seq():
    p = _capture(Attention(), 2, 8, 8, seq=True)
    a = analyze_memory(p)
    # scores (B,S,S) then softmax: two S^2 buffers (8 B S^2); then probs @ x: S^2 + (B,S,8) = 4BS^2 + 32BS.
    # Neither dominates: below S = 8 the second is larger.
    assert sympy.simplify(a.peak_expr - sympy.Max(8 * B * S**2, 4 * B * S**2 + 32 * B * S)) == 0
    assert a.at(batch=2, seq=4).activations == 384 and _near(_measured(p, batch=2, seq=4), 384)
    assert a.at(batch=3, seq=16).activations == 8 * 3 * 256 and _near(_measured(p, batch=3, seq=16), 8 * 3 * 256)
    assert str(a.expr_of("input")) == "32*batch*seq"


def test_weights_by_kind_and_dtype(program):
    a = analyze_memory(program("dlrm:tiny"))
    kinds = {(r["kind"], r["dtype"]): r for r in a.weights_by_kind()}
    assert kinds[("embedding", "float32")]["bytes"] == (100 + 80 + 60 + 40) * 8 * 4
    assert kinds[("embedding", "float32")]["tensors"] == 4
    assert ("dense", "float32") in kinds and ("other", "float32") in kinds
    assert a.weight_bytes == program("dlrm:tiny").parameter_bytes()
    # bert4rec ties its item table to the scoring head: counted once, as an embedding table
    b = analyze_memory(program("bert4rec:tiny"))
    item = [w for w in b.weights if w.name.endswith("word_embeddings.weight")]
    assert len(item) == 1 and item[0].kind == "embedding"


def test_quantized_tables_count_their_stored_bytes(program):
    p8, _ = graphopt.optimize(program("dlrm:tiny"), "quantize-embeddings{min_rows=50}")
    p4, _ = graphopt.optimize(program("dlrm:tiny"), "quantize-embeddings{bits=4 min_rows=50}")
    rows = {"8": analyze_memory(p8).weights_by_kind(), "4": analyze_memory(p4).weights_by_kind()}
    codes8 = next(r for r in rows["8"] if r["kind"] == "embedding" and r["dtype"] == "uint8")
    codes4 = next(r for r in rows["4"] if r["kind"] == "embedding" and r["dtype"] == "uint8 (4-bit packed)")
    assert codes8["bytes"] == (100 + 80 + 60) * 8  # tables of >= 50 rows, one byte per value
    assert codes4["bytes"] == (100 + 80 + 60) * 4  # two values per byte
    assert dtype_bits(torch.uint4) == 4 and dtype_bits(torch.bfloat16) == 16


@pytest.mark.parametrize("name", ["bert4rec:tiny", "dlrm:tiny"])
def test_prediction_matches_an_eager_run(program, name):
    p = program(name)
    a = analyze_memory(p)
    for batch, seq in ((1, 16), (16, 48)):
        predicted = a.at(batch=batch, seq=seq).activations
        measured = _measured(p, batch=batch, seq=seq)
        assert predicted == pytest.approx(measured, rel=0.05), (batch, seq, predicted, measured)


def test_allocations_by_node_names_the_scratch(program):
    p = program("bert4rec:tiny")
    inputs = p.sample_inputs(batch=4, seq=32)
    per_node = allocations_by_node(p.gm, inputs)
    sdpa = next(n for n in p.gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    out = 4 * 4 * 32 * 8 * 4  # (batch, heads, seq, head_dim) float32
    assert per_node[sdpa.name] > out  # the float mask, logsumexp and blocks inside the kernel
    assert analyze_memory(p).bytes_by_node({"batch": 4, "seq": 32})[sdpa.name] == per_node[sdpa.name]


def test_t5s_strided_position_bias_is_copied_inside_sdpa(program):
    """T5 after O2: its float mask (position bias + padding) arrives heads-innermost, and CPU SDPA
    copies it contiguous inside the call (was unmodelled: O2 measured 1.43x the prediction at 7 x 200)."""
    p, _ = graphopt.optimize(program("t5-rec:tiny"), "O2")
    inputs = p.sample_inputs(batch=7, seq=64)
    per_node = allocations_by_node(p.gm, inputs)
    predicted = analyze_memory(p).bytes_by_node({"batch": 7, "seq": 64})
    sdpa = [n for n in p.gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    strided = [n for n in sdpa if n.args[3].meta["val"].stride()[-1] not in (0, 1) and n.args[3].meta["val"].shape[-1] != 1]
    assert len(strided) == 2  # the encoder's two layers
    for n in strided:
        assert per_node[n.name] > 7 * 4 * 64 * 64 * 4  # the (batch, heads, q, k) float32 copy
        assert predicted[n.name] == pytest.approx(per_node[n.name], rel=0.05), n.name
    assert analyze_memory(p).at(batch=7, seq=64).activations == pytest.approx(_measured(p, batch=7, seq=64), rel=0.05)


def test_analysis_manager_computes_shapes_first(program):
    p = program("dlrm:tiny")
    am = AnalysisManager()
    result = am.get("memory", p)
    assert am.is_valid("shapes") and am.get("memory", p) is result
    am.invalidate(frozenset({"shapes"}))
    assert not am.is_valid("memory")


def test_sizes_parse_and_print():
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("4096") == 4096
    assert parse_bytes("512mb") == 512 * 10**6
    for bad in ("two", "2XB", "-1GB", ""):
        with pytest.raises(ValueError, match="size like"  if bad != "-1GB" else "positive"):
            parse_bytes(bad)
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 2**30) == "3.0 GiB"
