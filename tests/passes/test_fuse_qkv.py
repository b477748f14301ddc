from __future__ import annotations

import torch

import graphopt
from tests.models import SASREC_DYNAMIC, SASRec, sasrec_inputs
from tests.passes._helpers import assert_equivalent

LINEAR = "aten.linear.default"


def test_bert4rec_qkv_merged_per_layer(program):
    prog = program("bert4rec:tiny")
    optimized, report = graphopt.optimize(prog, "fuse-qkv,dce")
    rec = report.passes[0]
    assert rec.stats == {"groups-merged": 2}
    assert "2 groups merged (6 linears)" in rec.notes
    after = optimized.op_histogram()
    assert after[LINEAR] == prog.op_histogram()[LINEAR] - 4
    assert after["aten.split_with_sizes.default"] == 2
    assert_equivalent(prog, optimized, 1e-5)  # incl. batch 2, seq 24


def test_bert_cls_qkv_merged(program):
    prog = program("bert-cls:tiny")
    optimized, report = graphopt.optimize(prog, "fuse-qkv,dce")
    assert report.passes[0].stats == {"groups-merged": 2}
    assert optimized.op_histogram()["aten.split_with_sizes.default"] == 2
    assert_equivalent(prog, optimized, 1e-5)


def test_sasrec_manual_projections_merged():
    model = SASRec().eval()
    prog = graphopt.capture(model, sasrec_inputs(), dynamic=SASREC_DYNAMIC, input_ranges={"input_ids": (0, 41)})
    optimized, report = graphopt.optimize(prog, "fuse-qkv,dce")
    assert report.passes[0].stats == {"groups-merged": 2}
    x = sasrec_inputs(batch=5, seq=13, seed=3)["input_ids"]
    torch.testing.assert_close(optimized(x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_near_miss_different_inputs_and_flattening_view():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.c, self.d = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

        def forward(self, x, y, z):
            separate = self.a(x) + self.b(y)          # different inputs: not siblings
            flat = self.c(z).view(-1)                  # merging the feature dim needs contiguous memory
            return separate, flat, self.d(z)

    prog = graphopt.capture(M().eval(), (torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)))
    optimized, report = graphopt.optimize(prog, "fuse-qkv")
    rec = report.passes[0]
    assert rec.modified is False
    assert any("contiguous" in d for d in rec.declined)
    assert any("no sibling left" in d for d in rec.declined)
    assert optimized.op_histogram()[LINEAR] == 4


def test_t5_projections_merged_and_gpt2_reported_as_already_fused(program):
    prog = program("t5-rec:tiny")
    optimized, report = graphopt.optimize(prog, "fuse-qkv,dce")
    rec = report.passes[0]
    # encoder self x2 (q, k, v), decoder self (q, k, v), cross-attention (k, v read the encoder output)
    assert rec.stats == {"groups-merged": 4}
    assert sorted(d["out_features"] for d in rec.details) == [[32, 32], [32, 32, 32], [32, 32, 32], [32, 32, 32]]
    assert_equivalent(prog, optimized, 1e-5)

    gpt = program("gpt-rec:tiny")  # GPT-2's c_attn is one projection already (captured as linear + split)
    _, report = graphopt.optimize(gpt, "fuse-qkv")
    rec = report.passes[0]
    assert rec.modified is False
    assert rec.notes == ["2 linears were already one projection + split (e.g. GPT-2's c_attn)"]
