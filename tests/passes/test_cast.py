"""cast: which ops run in bf16 vs fp32 under each policy; numerics within the stated
tolerance (bf16 0.1, fp16 0.02, atol = rtol); idempotent (second run is a no-op).
The ranking test against torch.autocast is in test_cast_beyond_zoo.py (real MiniLM)."""

from __future__ import annotations

import pytest
import torch
from graphopt.passes.cast import DEFAULT_KEEP, TOLERANCE, Cast

import graphopt
from graphopt.errors import PassOptionError
from graphopt.metrics import drift
from graphopt.passlib.precision import LOW_PRECISION_OPS
from tests.passes._helpers import assert_equivalent

aten = torch.ops.aten
BF16, FP32 = torch.bfloat16, torch.float32
NO_SCORE = ",".join(k for k in DEFAULT_KEEP if k not in ("score", "tail"))


def _dtype(node):
    return node.meta["val"].dtype


def _calls(program, *ops):
    return [n for n in program.gm.graph.nodes if n.op == "call_function" and n.target in ops]


def _matrix_ops(program):
    return [n for n in program.gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "overloadpacket", None) in LOW_PRECISION_OPS]


def _rows_have_seq(node) -> bool:
    """Whether a matrix op runs on every position: its output's leading dims carry seq's symbol."""
    ids = next(n for n in node.graph.nodes if n.op == "placeholder")
    seq = str(ids.meta["val"].shape[1])
    return any(seq in str(d) for d in node.meta["val"].shape[:-1])


@pytest.fixture(scope="module")
def bert4rec_o2(program):
    ref = program("bert4rec:tiny")
    out, report = graphopt.optimize(ref, "O2,cast")
    return ref, out, report


def test_mixed_policy_structure(bert4rec_o2):
    """Default (policy=mixed): matrix ops on every position in bf16; the residual stream,
    layer norms, embeddings, the positions the output reads (after prune-positions) and
    the scoring head in fp32."""
    ref, out, report = bert4rec_o2
    stats = report.passes[-1].stats
    assert stats["weight"] > 0 and stats["boundary-cast"] > 0 and stats["low-matrix-op"] > 0
    wide = [n for n in _matrix_ops(out) if _rows_have_seq(n)]
    tail = [n for n in _matrix_ops(out) if not _rows_have_seq(n)]
    assert wide and all(_dtype(n) == BF16 for n in wide)
    assert tail and all(_dtype(n) == FP32 for n in tail)  # the last layer's query rows, FFN, the head
    for node in _calls(out, aten.linear.default):
        assert _dtype(node.args[1]) == _dtype(node)  # weights stored in the dtype their op computes in
    for node in _calls(out, aten.layer_norm.default):
        assert _dtype(node.args[0]) == FP32 and _dtype(node) == FP32
    for node in _calls(out, aten.embedding.default):
        assert _dtype(node) == FP32
    # a bf16 GEMM output is widened where it meets the fp32 residual stream
    residual = [n for n in _calls(out, aten.add.Tensor) if any(a.target is aten._to_copy.default and a.args[0] in wide
                                                                for a in n.all_input_nodes)]
    assert len(residual) >= 2 and all(_dtype(a) == FP32 for n in residual for a in [n, *n.all_input_nodes])
    (head,) = _calls(out, aten.matmul.default)
    assert _dtype(head) == FP32 and _dtype(head.args[1]) == FP32


def test_mixed_policy_numerics(bert4rec_o2):
    ref, out, _ = bert4rec_o2
    assert_equivalent(ref, out, TOLERANCE["bf16"], shapes=((None, None), (1, 8)))
    assert all(o.dtype == FP32 for o in out(*ref.sample_inputs(batch=2, seed=3)))


def test_fast_policy_runs_everything_but_keep_in_bf16(program):
    ref = program("bert4rec:tiny")
    out, report = graphopt.optimize(ref, f"cast{{policy=fast keep={NO_SCORE}}}")
    assert_equivalent(ref, out, TOLERANCE["bf16"], shapes=((None, None), (1, 8)))
    assert all(_dtype(n) == BF16 for n in _matrix_ops(out))
    floats = [n for n in _calls(out, aten.add.Tensor, aten.embedding.default) if _dtype(n).is_floating_point]
    assert floats and all(_dtype(n) == BF16 for n in floats)  # the residual stream and embeddings too
    for node in _calls(out, aten.layer_norm.default):  # kept: fp32 in and out
        assert _dtype(node.args[0]) == FP32 and _dtype(node) == FP32
    assert out.parameter_bytes() < 0.6 * ref.parameter_bytes()
    assert report.passes[0].modified


def test_dlrm_mixed(program):
    ref = program("dlrm:tiny")
    out, _ = graphopt.optimize(ref, "O2,cast")
    assert_equivalent(ref, out, TOLERANCE["bf16"], shapes=((None, None), (1, 8)))
    matrix = _matrix_ops(out)
    assert any(_dtype(n) == BF16 for n in matrix) and _dtype(matrix[-1]) == FP32  # the CTR head stays fp32
    assert all(_dtype(n) == FP32 for n in _calls(out, aten.sum.dim_IntList))  # pooled embedding sums


def test_score_and_tail_are_what_keep_says(program):
    """Near misses: without 'score'/'tail' in keep the head and the last layer's rows run in bf16;
    without prune-positions every matrix op runs on all positions, so there is no tail."""
    ref = program("bert4rec:tiny")
    loose, _ = graphopt.optimize(ref, f"O2,cast{{keep={NO_SCORE}}}")
    assert all(_dtype(n) == BF16 for n in _matrix_ops(loose))
    no_prune, _ = graphopt.optimize(ref, "cast")
    head = _calls(no_prune, aten.matmul.default)
    assert [_dtype(n) for n in head] == [FP32]
    assert sum(_dtype(n) == FP32 for n in _matrix_ops(no_prune)) == 1  # only the head


def test_skip_keeps_the_matched_layers_fp32(program):
    """``skip``: the matrix ops of the matched module paths (and their weights) stay fp32,
    the report names them; every other matrix op on all positions still runs bf16; numerics
    within the bf16 tolerance, and closer to fp32 than without skip."""
    from graphopt.ir.fx import module_path

    ref = program("gpt-rec:tiny")
    full, _ = graphopt.optimize(ref, "O2,cast")
    out, report = graphopt.optimize(ref, "O2,cast{skip=*.h.0.attn.c_attn,*.h.0.mlp.*}")
    skipped = [n for n in _matrix_ops(out) if module_path(n).endswith(("h.0.attn.c_attn", "h.0.mlp.c_fc",
                                                                        "h.0.mlp.c_proj"))]
    assert len(skipped) == 3 and all(_dtype(n) == FP32 and _dtype(n.args[1]) == FP32 for n in skipped)
    others = [n for n in _matrix_ops(out) if n not in skipped and _rows_have_seq(n)]
    assert others and all(_dtype(n) == BF16 for n in others)  # h.0's SDPA and attn.c_proj, and so on
    declined = report.passes[-1].declined
    assert sum("matched skip, kept fp32" in d for d in declined) == 3
    assert any("h.0.attn.c_attn" in d for d in declined)
    assert_equivalent(ref, out, TOLERANCE["bf16"], shapes=((None, None), (1, 8)))
    x = ref.sample_inputs(batch=16, seed=4)
    assert drift(out(*x), ref(*x))["max_abs"] < drift(full(*x), ref(*x))["max_abs"]
    # a pattern that matches nothing changes nothing
    none, _ = graphopt.optimize(ref, "O2,cast{skip=*.no_such_layer}")
    assert [_dtype(n) for n in _matrix_ops(none)] == [_dtype(n) for n in _matrix_ops(full)]


def test_fp16_is_closer_than_bf16(program):
    ref = program("bert4rec:tiny")
    x = ref.sample_inputs(batch=16, seed=4)
    errs = {}
    for dtype in ("bf16", "fp16"):
        out, _ = graphopt.optimize(ref, f"cast{{dtype={dtype} policy=fast}}")
        errs[dtype] = drift(out(*x), ref(*x))["max_abs"]
        assert errs[dtype] <= TOLERANCE[dtype]
    assert errs["fp16"] < errs["bf16"]  # 10 vs 7 mantissa bits


def test_io_native_changes_the_contract(program):
    out, _ = graphopt.optimize(program("dlrm:tiny"), "cast{io=native}")
    assert out.inputs[0].dtype == BF16
    (y,) = out(*out.sample_inputs(batch=3, seed=1))
    assert y.dtype == BF16


def test_second_run_is_a_no_op(program, bert4rec_o2):
    _, once, _ = bert4rec_o2
    _, report = graphopt.optimize(once, "cast")
    assert report.passes[0].modified is False
    fast, _ = graphopt.optimize(program("bert4rec:tiny"), "cast{policy=fast}")
    _, report = graphopt.optimize(fast, "cast{policy=fast}")
    assert report.passes[0].modified is False


def test_round_trip_save_load(program, tmp_path):
    out, _ = graphopt.optimize(program("dlrm:tiny"), "cast")
    loaded = graphopt.Program.load(out.save(tmp_path / "bf16.pt2"))
    x = out.sample_inputs(batch=5, seed=2)
    torch.testing.assert_close(loaded(*x), out(*x), atol=0, rtol=0)


def test_options_are_checked():
    with pytest.raises(PassOptionError, match="neither"):
        Cast(keep="layernorm")
    with pytest.raises(PassOptionError):
        Cast(dtype="fp8")
    with pytest.raises(PassOptionError, match="not one of"):
        Cast(policy="fastest")
    with pytest.raises(PassOptionError, match="overflows"):
        Cast(dtype="fp16", policy="fast", keep="score")
    assert Cast(dtype="fp16").tolerance == TOLERANCE["fp16"]
    assert str(graphopt.parse_pipeline("cast{policy=fast}")).startswith("cast{dtype=bf16 io=preserve keep=")


def test_a_second_cast_reports_no_rewrites(bert4rec_o2):
    """Was: modified=False beside stats {'low-matrix-op': 4, 'kept-fp32': 6}, so the report's table said
    "changed no, rewrites 10"; what a second cast finds is now a note."""
    _, once, _ = bert4rec_o2  # O2,cast
    twice, report = graphopt.optimize(once, "cast{dtype=bf16}")
    rec = report.passes[0]
    assert not rec.modified and rec.stats == {}
    assert any(n.startswith("nothing left to cast to torch.bfloat16 (") for n in rec.notes), rec.notes
    assert twice.op_histogram() == once.op_histogram()
