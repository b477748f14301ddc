from __future__ import annotations

import torch

import graphopt
from tests.models import SASREC_DYNAMIC, SASRec, sasrec_inputs
from tests.passes._helpers import assert_equivalent

SDPA = "aten.scaled_dot_product_attention.default"
SOFTMAX = "aten.softmax.int"
RANGES = {"input_ids": (0, 41)}


def _eager_bert():
    from transformers import BertModel

    from graphopt.rec.zoo import available_models

    available_models()  # load the whole zoo first: importing models.bert alone registers only bert
    from graphopt.rec.zoo.bert import SIZES, _bert_config

    config = _bert_config(SIZES["tiny"], 52)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 52, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    prog = graphopt.capture(model, {"input_ids": ids, "attention_mask": mask}, dynamic=dyn,
                            input_ranges={"input_ids": (1, 52), "attention_mask": (1, 2)})
    return model, prog


def test_eager_bert_attention_becomes_sdpa_with_mask():
    model, prog = _eager_bert()
    assert prog.op_histogram()[SDPA] == 0 and prog.op_histogram()[SOFTMAX] == 2
    optimized, report = graphopt.optimize(prog, "remove-dropout,fuse-attention,dce")
    rec = report.passes[1]
    assert "2 of 2 attention blocks fused" in rec.notes
    after = optimized.op_histogram()
    assert after[SDPA] == 2 and after[SOFTMAX] == 0 and after["aten.matmul.default"] == 0
    sdpa = [n for n in optimized.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert all(n.args[3] is not None for n in sdpa)  # the padding mask is carried
    assert_equivalent(prog, optimized, 1e-5)
    # against the eager model itself, with real padding
    ids = torch.randint(1, 52, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(optimized(ids, mask)[0], ref, atol=1e-5, rtol=1e-5)


def test_sasrec_manual_causal_attention_fused():
    model = SASRec().eval()
    prog = graphopt.capture(model, sasrec_inputs(), dynamic=SASREC_DYNAMIC, input_ranges=RANGES)
    optimized, report = graphopt.optimize(prog, "remove-dropout,fuse-attention,dce")
    rec = report.passes[1]
    assert rec.stats == {"attention-blocks": 2} and rec.declined == []
    assert optimized.op_histogram()[SDPA] == 2 and optimized.op_histogram()[SOFTMAX] == 0
    x = sasrec_inputs(batch=4, seq=15, seed=2)["input_ids"]
    torch.testing.assert_close(optimized(x)[0], model(x), atol=1e-5, rtol=1e-5)
    assert_equivalent(prog, optimized, 1e-5, shapes=((None, None), (2, 6)))


def test_sasrec_multihead_attention_module_fused():
    # nn.MultiheadAttention with need_weights=True: bmm/baddbmm path, query pre-scaled.
    # Captured static: shape propagation of baddbmm with symbolic sizes fails in torch's meta.
    model = SASRec(attention="mha").eval()
    prog = graphopt.capture(model, sasrec_inputs(), dynamic=False, input_ranges=RANGES)
    assert prog.op_histogram()["aten.baddbmm.default"] == 2
    optimized, report = graphopt.optimize(prog, "remove-dropout,fuse-attention,dce")
    assert "2 of 2 attention blocks fused" in report.passes[1].notes
    after = optimized.op_histogram()
    assert after[SDPA] == 2 and after["aten.baddbmm.default"] == 0 and after["aten.bmm.default"] == 0
    x = sasrec_inputs(seed=5)["input_ids"]
    torch.testing.assert_close(optimized(x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_bert_sdpa_path_reports_nothing_to_fuse(program):
    prog = program("bert4rec:tiny")
    _, report = graphopt.optimize(prog, "fuse-attention")
    rec = report.passes[0]
    assert rec.modified is False
    assert rec.notes == ["0 of 0 attention blocks fused", "2 blocks were already scaled_dot_product_attention"]


def test_near_miss_finite_fill_and_probs_read_outside():
    model = SASRec(fill=-1e9).eval()
    prog = graphopt.capture(model, sasrec_inputs(), dynamic=SASREC_DYNAMIC, input_ranges=RANGES)
    optimized, report = graphopt.optimize(prog, "remove-dropout,fuse-attention")
    rec = report.passes[1]
    assert rec.modified is False and "0 of 2 attention blocks fused" in rec.notes
    assert len(rec.declined) == 2 and all("masked_fill value -1000000000.0" in d for d in rec.declined)
    text = report.render()
    assert "declined (x2): masked_fill value" in text and "0 of 2 attention blocks fused" in text

    class ReturnsProbs(torch.nn.Module):
        def forward(self, q, k, v):
            p = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
            return p @ v, p  # attention weights are an output

    prog = graphopt.capture(ReturnsProbs(), tuple(torch.randn(2, 2, 5, 4) for _ in range(3)))
    _, report = graphopt.optimize(prog, "fuse-attention")
    rec = report.passes[0]
    assert rec.modified is False
    assert "read outside the attention block" in rec.declined[0]


def test_finite_fill_fused_when_allowed():
    model = SASRec(fill=-1e9).eval()
    prog = graphopt.capture(model, sasrec_inputs(), dynamic=SASREC_DYNAMIC, input_ranges=RANGES)
    optimized, report = graphopt.optimize(prog, "remove-dropout,fuse-attention{finite_mask_fill=true}")
    assert report.passes[1].stats == {"attention-blocks": 2}
    x = sasrec_inputs(batch=2, seq=9, seed=4)["input_ids"]  # causal rows always keep key 0
    torch.testing.assert_close(optimized(x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_t5_biased_unscaled_attention_becomes_sdpa(zoo, program):
    """T5: ``q @ k^T * 1.0 + position_bias + mask``: SDPA with scale 1.0 and mask = bias + mask."""
    prog = program("t5-rec:tiny")  # 2 encoder self, 1 decoder self, 1 cross attention
    optimized, report = graphopt.optimize(prog, "remove-dropout,fuse-attention,dce")
    rec = report.passes[1]
    assert rec.stats == {"attention-blocks": 4} and rec.declined == []
    assert "4 of 4 attention blocks fused" in rec.notes
    after = optimized.op_histogram()
    assert after[SDPA] == 4 and after[SOFTMAX] == 0 and after["aten.matmul.default"] == 0
    for sdpa in (n for n in optimized.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default):
        assert sdpa.kwargs["scale"] == 1.0
        mask = sdpa.args[3]
        assert mask.target == torch.ops.aten.add.Tensor  # relative-position bias + padding mask, one term
    assert_equivalent(prog, optimized, 1e-5)
    zm = zoo("t5-rec:tiny")
    inputs = zm.make_inputs(batch=3, seq=11, seed=4)  # left padding on some rows
    with torch.no_grad():
        torch.testing.assert_close(optimized(*inputs.values())[0], zm.module(**inputs), atol=1e-5, rtol=1e-5)


def test_near_miss_two_products_added_and_bias_that_broadcasts_scores():
    class ScoresPlusScores(torch.nn.Module):  # not an attention mask: a second q @ k^T
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) + (q * 2) @ k.transpose(-2, -1), dim=-1) @ v

    class BiasWidensScores(torch.nn.Module):  # the bias makes the scores bigger: not a mask
        def forward(self, q, k, v, bias):
            return torch.softmax(q @ k.transpose(-2, -1) + bias, dim=-1) @ v

    qkv = tuple(torch.randn(2, 1, 5, 4) for _ in range(3))
    for model, inputs, reason in (
        (ScoresPlusScores(), qkv, "q @ k^T products"),
        (BiasWidensScores(), (*qkv, torch.randn(2, 3, 5, 5)), "broadcasts the scores to a bigger shape"),
    ):
        prog = graphopt.capture(model, inputs, dynamic=False)
        optimized, report = graphopt.optimize(prog, "fuse-attention")
        rec = report.passes[0]
        assert rec.modified is False and len(rec.declined) == 1 and reason in rec.declined[0], rec.declined
        assert optimized.op_histogram() == prog.op_histogram()
