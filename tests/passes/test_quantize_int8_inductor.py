"""quantize-int8 on AOTInductor, proven from the generated code: every quantized linear
runs as oneDNN ``qlinear_pointwise`` (weights prepacked by freezing), requantization and
gelu fused into the FFN's first GEMM (int8 carried to the second), residual adds fused as
``sum`` post-ops, no dequantize and no fp32 GEMM left; numerics against eager fp32; one
package serves two shapes (dynamic batch/seq, no recompile). This is the one int8 AOTI
compile of the suite (tests/runtimes/test_conformance.py runs inductor on fp32 only)."""

from __future__ import annotations

import pytest
import torch
from graphopt.runtimes.inductor_code import wrapper_calls, wrapper_source

import graphopt
from graphopt.metrics import cosine, topk_overlap
from tests.passes._precision import calibration

DQC = "quantized_decomposed.dequantize_per_channel.default"


@pytest.fixture(scope="module")
def lowered(zoo, program, tmp_path_factory):
    """bert4rec:tiny, O2 + int8 with the guard off (every linear int8), as an AOTI package."""
    ref = program("bert4rec:tiny")
    q, _ = graphopt.optimize(ref, "O2,quantize-int8{max_drop=0}", calibration_data=calibration(zoo("bert4rec:tiny")))
    out = tmp_path_factory.mktemp("int8-aoti") / "inductor"
    artifact = graphopt.lower(q, "inductor", out, device="cpu")
    assert artifact.manifest["backend"]["inductor_configs"]["freezing"] is True
    return ref, q, out


def test_every_quantized_linear_is_a_onednn_int8_gemm(lowered):
    _, q, out = lowered
    calls = wrapper_calls(wrapper_source(out / "model.pt2"))
    qlinears = [c for c in calls if c.is_qlinear]
    ops = q.op_histogram()
    # O2 on bert4rec:tiny: 2 layers x (fused qkv, query of the last position, attention out,
    # ffn up, ffn down; prune-positions splits layer 1's q from kv) + transform + scoring head
    assert ops[DQC] == len(qlinears) >= 11, (ops[DQC], [c.kernel for c in calls])
    # no weight dequantized at run time, no fp32 GEMM: all folded into the int8 kernels
    kernels = [c.kernel for c in calls]
    assert not [k for k in kernels if "dequantize" in k], kernels
    assert not [k for k in kernels if k in ("aoti_torch_cpu_addmm", "aoti_torch_cpu_mm", "aoti_torch_cpu_bmm",
                                            "aoti_torch_cpu__addmm_activation", "aoti_torch_cpu__linear_pointwise")]
    # ffn up: gelu and the next linear's quantization fused, uint8 out (int8 carried to ffn down)
    carried = [c for c in qlinears if c.output_dtype == "uint8"]
    assert len(carried) == 2 and all(c.post_ops == ("gelu",) for c in carried), qlinears
    # attention output projection: the residual add fused as a sum post-op
    assert any("sum" in c.post_ops for c in qlinears), qlinears
    assert all(c.output_dtype in ("float32", "uint8") for c in qlinears)


def test_numerics_against_eager_fp32(lowered, zoo):
    ref, q, out = lowered
    # inputs like the calibration batches (zoo inputs: the [mask] item last at the calibrated
    # length; the last position's ranges are position-dependent), at another batch size
    x = tuple(zoo("bert4rec:tiny").make_inputs(batch=16, seed=21).values())
    with graphopt.load(out) as runner:
        got = runner(*x)[0]
    want = ref(*x)[0]
    # int8 vs fp32: stated tolerance on the scores' direction and the top-10 items
    assert cosine(got, want) > 0.999
    assert topk_overlap(got, want) >= 0.9
    # vs the QDQ Program (same quantization, eager reference kernels): rounding differences only
    torch.testing.assert_close(got, q(*x)[0], atol=0.05, rtol=0.05)


def test_one_package_serves_two_shapes(lowered):
    _, q, out = lowered
    with graphopt.load(out) as runner:
        for batch, seq in [(1, 8), (3, 12)]:
            feeds = q.sample_inputs(batch=batch, seq=seq, seed=3)
            (got,), (want,) = runner(*feeds), q(*feeds)
            assert got.shape == want.shape
            # oneDNN int8 GEMMs vs the QDQ reference ops: rounding of requantized values
            assert (got - want).abs().max().item() <= 5e-2 + 5e-2 * want.abs().max().item()
