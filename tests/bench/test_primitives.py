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
    """bf16 where oneDNN runs bf16 on this CPU (plain ``linear`` goes to oneDNN then); on a
    CPU without avx512/avx_ne_convert (AMD EPYC with AVX2 only) fp32, where plain ``linear``
    goes to MKL and only the packed oneDNN linear is traced."""
    torch.manual_seed(0)
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    dtype, plain_calls, want = (torch.bfloat16, 2, "bf16->bf16") if bf16 else (torch.float32, 0, "f32->f32")
    x, w, b = (t.to(dtype) for t in (torch.randn(96, 64), torch.randn(48, 64), torch.randn(48)))
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 96) if hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight") else None
    with torch.no_grad(), onednn_trace() as trace:
        for _ in range(plain_calls):
            torch.nn.functional.linear(x, w, b)
        if packed is not None:
            torch.ops.mkldnn._linear_pointwise(x, packed, b, "gelu", [], "none")
    if plain_calls + (packed is not None) == 0:
        pytest.skip("nothing on this CPU and torch build goes through oneDNN's GEMM")
    records = trace.records()
    assert records, trace.text[:500]
    gemms = [r for r in summarize(records) if r.mkn == (96, 64, 48)]
    assert sum(r.calls for r in gemms) == plain_calls + (packed is not None), summarize(records)
    assert all(r.dtypes == want and r.ms > 0 for r in gemms)
    if packed is not None:  # the fused activation is reported as the GEMM's post-op
        assert any("gelu" in r.post_ops for r in gemms), gemms
    # the traced output went to the trace, and nothing else is parsed as a record
    assert parse_verbose(["onednn_verbose,v1,primitive,info,template:operation,engine", "hello"]) == []
