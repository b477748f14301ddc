"""The default ``O2,quantize-int8`` outside the zoo: real pretrained MiniLM-L6 holds the
fidelity bar through the accuracy guard (which names the layers it kept float), and
GPT-2 (Conv1D ``addmm``), T5 (one decoder step), an EmbeddingBag model with per-sample
weights and hand-written attention are quantized, with every GEMM left float explained."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.metrics import cosine, topk_overlap
from tests.passes import int8_models
from tests.passes._precision import calibration

DQC = "quantized_decomposed.dequantize_per_channel.default"
SEQ = {0: "batch", 1: "seq"}


def _check_batches(make_batch, seeds=range(40, 44)):
    return [make_batch(s) for s in seeds]


def test_minilm_ranking_holds_the_bar():
    model, example, make_batch = int8_models.minilm_ranker()
    program = graphopt.capture(model, dict(zip(("input_ids", "attention_mask"), example)),
                               dynamic={"input_ids": SEQ, "attention_mask": SEQ})
    calib = [make_batch(s) for s in range(1, 9)]  # 8 x 8 titles; the guard holds out the last 2
    q, report = graphopt.optimize(program, "O2,quantize-int8", calibration_data=calib)
    rec = report.passes[-1]
    checks = _check_batches(make_batch, range(40, 60))  # 160 titles: one missed slot moves it by 0.0006
    with torch.no_grad():
        refs = [model(*b) for b in checks]
        outs = [q(*b)[0] for b in checks]
    overlap = sum(topk_overlap(o, r) for o, r in zip(outs, refs)) / len(refs)
    # the bar on 160 titles the guard never saw (without the guard every layer int8 gives ~0.91).
    # 32 of them were too few to judge it: with 7-bit weights (a CPU without VNNI/AMX,
    # reduce_range=auto) the same Program scored 0.984 on seeds 40-43 and 0.994 on seeds 44-59,
    # 0.992 on all 160 (AMD EPYC, AVX2 only, 2026-12-06; 8-bit weights: 0.991 / 0.992)
    assert overlap >= 0.99, (overlap, rec.notes)
    assert min(cosine(o, r) for o, r in zip(outs, refs)) > 0.999
    # some layers stay int8, the kept ones are float in the graph and named with the reason
    kept = [d for d in rec.details if not d["quantized"]]
    assert 0 < rec.stats["linear"] == q.op_histogram()[DQC] and rec.stats["kept-float"] == len(kept)
    assert all("accuracy guard" in d["reason"] for d in kept)
    assert sum("kept float by the accuracy guard" in d for d in rec.declined) == len(kept)
    assert any("target" in n for n in rec.notes)
    # 16 held-out titles cannot certify the bar, and the guard says so; what it chose on them is
    # then scored on all 64 calibration titles (the rewritten Program), where it held 0.9953 here
    assert any("only 16 held-out rows (160 top-10 slots)" in n for n in rec.notes), rec.notes
    assert any("the rewritten Program" in n and "on all 8 calibration batches" in n for n in rec.notes), rec.notes
    print("MiniLM kept float:", [d["layer"] for d in kept])  # for the report (-s)


CASES = {
    # name: (builder, input names, dynamic dims, the GEMMs rewritten into linear first)
    "gpt2": (lambda: int8_models.hf_scorer("gpt2"), ("input_ids", "attention_mask"),
             {"input_ids": SEQ, "attention_mask": SEQ}, {}),  # capture canonicalizes Conv1D's addmm
    "t5": (lambda: int8_models.hf_scorer("t5"), ("input_ids", "attention_mask"),
           {"input_ids": SEQ, "attention_mask": SEQ}, {"as-linear:_addmm_activation": 4}),  # O2's no-bias FFN+relu
    "embedding-bag": (int8_models.bag_ctr, ("ids", "weights", "dense"),
                      {"ids": {0: "batch"}, "weights": {0: "batch"}, "dense": {0: "batch"}},
                      {"as-linear:_addmm_activation": 2}),
    "manual-attention": (int8_models.manual_attention, ("input_ids",), {"input_ids": SEQ},
                         {"as-linear:_addmm_activation": 2}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_default_int8_pipeline_beyond_the_zoo(name):
    build, names, dynamic, rewritten = CASES[name]
    model, example, make_batch = build()
    program = graphopt.capture(model, dict(zip(names, example)), dynamic=dynamic)
    # verify-each holds the pass to its flat tolerance (atol = rtol = 0.25), fit for O(1)
    # outputs; hand-written SASRec's scores reach |30|, so it is held to 5% of that below
    verify = None if name != "manual-attention" else False
    q, report = graphopt.optimize(program, "O2,quantize-int8", calibration_data=[make_batch(s) for s in range(1, 9)],
                                  verify_each=verify)
    rec = report.passes[-1]
    assert rec.stats["linear"] > 0 and q.op_histogram()[DQC] == rec.stats["linear"]
    assert {k: v for k, v in rec.stats.items() if k.startswith("as-linear:") and k != "as-linear:matmul"} == rewritten
    # no constant-weight GEMM is left unquantized without a reason in the report
    floats = [n for n in q.gm.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten._addmm_activation.default)]
    assert not floats, floats
    matmuls = [n for n in q.gm.graph.nodes if n.target in (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)]
    assert len([d for d in rec.declined if "computed operands" in d]) == len(matmuls)
    assert len([d for d in rec.declined if "accuracy guard" in d]) == rec.stats.get("kept-float", 0)
    # the guard held its target on held-out batches; on fresh batches (stated tolerance):
    # scores' direction within 1e-3, and the ranking where there is one
    assert any("accuracy guard" in n for n in rec.notes)
    for batch in _check_batches(make_batch, range(40, 42)):
        with torch.no_grad():
            got, want = q(*batch)[0], model(*batch)
        assert cosine(got, want) > 0.999
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        if want.dim() == 2 and want.shape[-1] > 10:
            assert topk_overlap(got, want) >= 0.95


def test_layers_the_check_of_the_rewritten_program_moved_say_so(zoo, program):
    """Was: every layer kept float read 'among the layers doing most damage alone (... with only it int8)',
    also those the guard had chosen int8 and the check of the rewritten Program on all calibration batches
    (accuracy_guard.confirm) moved out: their reason now names that check. On the AMX Xeon confirm moves
    3 of gpt-rec:tiny's layers here; another CPU's bf16 rounding may move none, so the count is read from
    the pass's own note."""
    import re

    zm = zoo("gpt-rec:tiny")
    q, report = graphopt.optimize(program("gpt-rec:tiny"), "O2,quantize-int8{mixed=bf16}",
                                  calibration_data=calibration(zm, n=4, batch=8))
    rec = report.passes[-1]
    moved = sum(int(n) for note in rec.notes for n in re.findall(r"(\d+) more layer\(s\) run", note))
    said = [d for d in rec.declined if "missed the target on all 4 calibration batches with it int8" in d]
    assert len(said) == moved, (rec.notes, rec.declined)
    assert not any("doing most damage alone" in d for d in said)
