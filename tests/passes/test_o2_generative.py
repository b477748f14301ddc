"""O2 on the GPT- and T5-style zoo models: what fused, what declined and why (the coverage report).

Verify-each is on (conftest): every pass is also checked to run and match its input within its tolerance.
"""

from __future__ import annotations

import torch

import graphopt
from tests.passes._helpers import assert_equivalent


def _passes(report):
    return {rec.name: rec for rec in report.passes}


def test_gpt_rec_o2_coverage(program):
    prog = program("gpt-rec:tiny")
    assert prog.op_histogram()["aten.addmm.default"] == 0  # Conv1D captured as linear (graphopt.ir.canonical)
    optimized, report = graphopt.optimize(prog, "O2")
    rec = _passes(report)
    # attention is SDPA already (attn_implementation="sdpa"); nothing to fuse, and the report says so
    assert rec["fuse-attention"].notes == ["0 of 0 attention blocks fused", "2 blocks were already scaled_dot_product_attention"]
    assert rec["fuse-qkv"].notes == ["2 linears were already one projection + split (e.g. GPT-2's c_attn)"]
    # gelu_new is tanh-gelu written out; CPU's fused kernel computes exact gelu: declined with the reason
    assert not rec["fuse-linear-act"].modified and len(rec["fuse-linear-act"].declined) == 2
    assert all("gelu(tanh) written out" in d and "on cpu" in d for d in rec["fuse-linear-act"].declined)
    # the score reads the last position only: the last block's MLP and norms run on it alone
    assert rec["prune-positions"].modified
    assert any("FLOPs" in n for n in rec["prune-positions"].notes)
    text = report.render()
    assert "declined (x2): gelu(tanh) written out" in text
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None), (2, 24), (1, 5)))


def test_t5_rec_o2_coverage(zoo, program):
    prog = program("t5-rec:tiny")
    optimized, report = graphopt.optimize(prog, "O2")
    rec = _passes(report)
    assert rec["fuse-attention"].stats == {"attention-blocks": 4} and rec["fuse-attention"].declined == []
    assert rec["fuse-qkv"].stats == {"groups-merged": 4}  # 3 self-attention q/k/v + cross-attention k/v
    assert rec["fuse-linear-act"].stats == {"linear+relu": 3}  # no bias: a zero one stands in
    after = optimized.op_histogram()
    assert after["aten.scaled_dot_product_attention.default"] == 4 and after["aten.softmax.int"] == 0
    assert after["aten._addmm_activation.default"] == 3 and after["aten.relu.default"] == 0
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None), (2, 24), (1, 5)))
    zm = zoo("t5-rec:tiny")
    inputs = zm.make_inputs(batch=3, seq=9, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(optimized(*inputs.values())[0], zm.module(**inputs), atol=1e-5, rtol=1e-5)
