"""graphopt.bench.primitives reads the primitives oneDNN really ran (no canned verbose text)."""

from __future__ import annotations

import pytest
import torch

from graphopt.bench.primitives import onednn_trace, parse_verbose, problem_mkn, summarize


def test_problem_shapes_fold_to_rows_reduction_columns():
    assert problem_mkn("inner_product", "mb2048ic256oc768") == (2048, 256, 768)
    assert problem_mkn("matmul", "2048x256:256x1024") == (2048, 256, 1024)
    assert problem_mkn("matmul", "32x4x64x64:32x4x64x64") == (32 * 4 * 64, 64, 64)  # batch dims fold into rows
    assert problem_mkn("reorder", "2048x256") is None and problem_mkn("inner_product", "mb1ic2") is None


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_a_traced_call_lists_the_gemms_it_ran_with_their_shapes_and_dtypes():
    torch.manual_seed(0)
    x, w, b = torch.randn(96, 64), torch.randn(48, 64), torch.randn(48)
    packed = torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), 96) if hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight") else None
    with torch.no_grad(), onednn_trace() as trace:
        torch.nn.functional.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16))
        torch.nn.functional.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16))
        if packed is not None:
            torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, b.to(torch.bfloat16), "gelu", [], "none")
    records = trace.records()
    assert records, trace.text[:500]
    gemms = [r for r in summarize(records) if r.mkn == (96, 64, 48)]
    assert sum(r.calls for r in gemms) == (3 if packed is not None else 2), summarize(records)
    assert all(r.dtypes == "bf16->bf16" and r.ms > 0 for r in gemms)
    if packed is not None:  # the fused activation is reported as the GEMM's post-op
        assert any("gelu" in r.post_ops for r in gemms), gemms
    # the traced output went to the trace, and nothing else is parsed as a record
    assert parse_verbose(["onednn_verbose,v1,primitive,info,template:operation,engine", "hello"]) == []
