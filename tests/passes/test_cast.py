"""cast: bf16/fp16 compute with an fp32 keep-list; numerics within the stated tolerance
(bf16 0.1, fp16 0.02, atol = rtol); idempotent (second run is a no-op)."""

from __future__ import annotations

import pytest
import torch
from graphopt.passes.cast import TOLERANCE, Cast

import graphopt
from graphopt.errors import PassOptionError
from graphopt.metrics import drift
from tests.passes._helpers import assert_equivalent

aten = torch.ops.aten


def _dtype(node):
    return node.meta["val"].dtype


@pytest.mark.parametrize("name", ["bert4rec:tiny", "dlrm:tiny"])
def test_bf16_numerics_and_structure(program, name):
    ref = program(name)
    out, report = graphopt.optimize(ref, "cast")
    assert_equivalent(ref, out, TOLERANCE["bf16"], shapes=((None, None), (1, 8)))
    stats = report.passes[0].stats
    assert stats["weight"] > 0 and stats["boundary-cast"] > 0
    nodes = list(out.gm.graph.nodes)
    for node in nodes:
        if node.target is aten.linear.default:
            assert _dtype(node) == torch.bfloat16 and _dtype(node.args[1]) == torch.bfloat16
        if node.target is aten.layer_norm.default:  # kept: fp32 in and out
            assert _dtype(node.args[0]) == torch.float32 and _dtype(node) == torch.float32
    assert all(o.dtype == torch.float32 for o in out(*ref.sample_inputs(batch=2, seed=3)))
    assert out.parameter_bytes() < 0.6 * ref.parameter_bytes()


def test_fp16_is_closer_than_bf16(program):
    ref = program("bert4rec:tiny")
    x = ref.sample_inputs(batch=16, seed=4)
    errs = {}
    for dtype in ("bf16", "fp16"):
        out, _ = graphopt.optimize(ref, f"cast{{dtype={dtype}}}")
        errs[dtype] = drift(out(*x), ref(*x))["max_abs"]
        assert errs[dtype] <= TOLERANCE[dtype]
    assert errs["fp16"] < errs["bf16"]  # 10 vs 7 mantissa bits


def test_keep_score_runs_the_head_in_fp32(program):
    out, _ = graphopt.optimize(program("bert4rec:tiny"), "cast{keep=layer_norm,softmax,score}")
    head = [n for n in out.gm.graph.nodes if n.target is aten.matmul.default]
    assert len(head) == 1 and _dtype(head[0]) == torch.float32


def test_io_native_changes_the_contract(program):
    out, _ = graphopt.optimize(program("dlrm:tiny"), "cast{io=native}")
    assert out.inputs[0].dtype == torch.bfloat16
    (y,) = out(*out.sample_inputs(batch=3, seed=1))
    assert y.dtype == torch.bfloat16


def test_second_run_is_a_no_op(program):
    once, _ = graphopt.optimize(program("bert4rec:tiny"), "cast")
    _, report = graphopt.optimize(once, "cast")
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
    assert Cast(dtype="fp16").tolerance == TOLERANCE["fp16"]
