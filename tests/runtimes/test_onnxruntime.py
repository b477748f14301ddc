"""onnxruntime: dynamic axes named after the InputSpecs, ORT fusions with a
safe fallback, bf16 refused, QDQ int8 runs on integer kernels."""

from __future__ import annotations

import json
import re
import shutil

import onnx
import pytest
import torch

from graphopt import optimize
from graphopt.errors import ArtifactError, LoweringError
from graphopt.ir.capture import capture
from graphopt.passlib.qdq import quantize_weight, weight_bits
from graphopt.runtime import available_runtimes, load, lower

pytestmark = pytest.mark.skipif(
    not available_runtimes()["onnxruntime"].available, reason=available_runtimes()["onnxruntime"].reason
)


@pytest.fixture(scope="module")
def bert_artifact(tmp_path_factory):
    from graphopt.rec.zoo import load_model

    prog = load_model("bert4rec:tiny").capture()
    return prog, lower(prog, "onnxruntime", tmp_path_factory.mktemp("ort") / "bert", save_optimized=True)


def test_dynamic_axes_are_named_after_the_input_specs(bert_artifact):
    _, art = bert_artifact
    model = onnx.load(str(art.entry))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    out = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out[0] == "batch"


def test_bert_gets_ort_fusions_and_optimized_model(bert_artifact):
    prog, art = bert_artifact
    fusions = art.manifest["backend"]["fusions"]
    assert fusions["attention"] == 2 and fusions["skip_layer_normalization"] >= 2
    assert art.manifest["backend"]["ops"]["com.microsoft.Attention"] == 2
    assert art.manifest["backend"]["optimized"] == "model.optimized.onnx"
    assert "model.optimized.onnx" in art.manifest["files"]
    feeds = prog.sample_inputs(batch=2, seq=6)
    for use_optimized in (True, False):
        with load(art.path, use_optimized=use_optimized, intra_op_threads=1) as runner:
            torch.testing.assert_close(runner(*feeds)[0], prog(*feeds)[0], atol=1e-4, rtol=1e-4)


def test_a_row_with_no_events_scores_as_torch_does(bert_artifact):
    # torch's attention gives a query row whose mask is all zeros zeros, ONNX's a mean of the values:
    # without export's guard these two users' scores moved by ~4e-3 (their top 10 by one item)
    prog, art = bert_artifact
    ids, mask = prog.sample_inputs(batch=4, seq=16)
    mask = mask.clone()
    mask[:2] = 0
    with load(art.path, intra_op_threads=1) as runner:
        out = runner(ids, mask)[0]
    torch.testing.assert_close(out, prog(ids, mask)[0], atol=1e-5, rtol=1e-5)
    assert art.manifest["backend"]["ops"]["com.microsoft.Attention"] == 2  # the guard keeps ORT's fusion


def test_fusions_off_is_plain_onnx(bert_artifact, tmp_path):
    prog, _ = bert_artifact
    art = lower(prog, "onnxruntime", tmp_path / "plain", fusions="off")
    assert "fusions" not in art.manifest["backend"]
    assert not any("." in op for op in art.manifest["backend"]["ops"])  # no com.microsoft ops


def test_an_opset_the_exporter_cannot_write_is_refused(bert_artifact, tmp_path):
    """Was: opset=3 (or 99) lowered at the exporter's own opset 18 while the manifest said 3."""
    prog, _ = bert_artifact
    with pytest.raises(LoweringError, match=r"^opset=3: the ONNX exporter cannot write bert4rec:tiny at that opset \(it wrote 18"):
        lower(prog, "onnxruntime", tmp_path / "old", opset=3)
    assert not (tmp_path / "old").exists()
    art = lower(prog, "onnxruntime", tmp_path / "17", opset=17, fusions="off")  # near miss: one it converts to
    assert art.manifest["options"]["opset"] == 17
    model = onnx.load(str(art.path / "model.onnx"))
    assert [o.version for o in model.opset_import if o.domain == ""] == [17]


def test_bf16_program_is_refused(tmp_path):
    """A model captured in bf16 is told to capture after model.float() (was: "drop the bf16 pass from the
    pipeline", which had none); a bf16 cast in the pipeline is told to drop it, int8-mixed-bf16 its option."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).to(torch.bfloat16).eval()
    prog = capture(model, (torch.randn(2, 8, dtype=torch.bfloat16),), dynamic={"input": {0: "batch"}})
    with pytest.raises(LoweringError, match=r"^onnxruntime \| .* computes in bfloat16 .* no bf16 kernels; lower it "
                                            r"with the inductor runtime, or capture the model after model\.float\(\)"):
        lower(prog, "onnxruntime", tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists()
    two = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    fp32 = capture(two, (torch.randn(2, 8),), dynamic={"input": {0: "batch"}})
    cast, _ = optimize(fp32, "cast{dtype=bf16}")  # the first linear in bf16 (the scoring head stays fp32)
    with pytest.raises(LoweringError, match=r"no bf16 kernels; lower it with the inductor runtime, or drop the bf16 "
                                            r"pass from the pipeline$"):
        lower(cast, "onnxruntime", tmp_path / "cast")
    mixed, _ = optimize(fp32, "quantize-int8{mixed=bf16 max_drop=0}", calibration_data=[(torch.randn(8, 8),)] * 4)
    with pytest.raises(LoweringError, match=r"no bf16 kernels; lower it with the inductor runtime, or drop "
                                            r"mixed=bf16 from quantize-int8 \(int8 with fp32 elsewhere runs here\)$"):
        lower(mixed, "onnxruntime", tmp_path / "mixed")  # was: "drop the bf16 pass", which it had none of


class _QLinear(torch.nn.Module):
    """x -> QDQ(int8, per-tensor) -> linear with a per-channel int8 weight (+ float bias)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

        g = torch.Generator().manual_seed(0)
        w = torch.randn(32, 16, generator=g)
        # 7-bit on CPUs whose int8 kernels saturate int16 pair sums (no VNNI/AMX), as the passes do
        wq, ws, wz = quantize_weight(w, bits=weight_bits("auto")[0])
        self.register_buffer("ws", ws)
        self.register_buffer("wq", wq)
        self.register_buffer("wz", wz)
        self.b = torch.nn.Parameter(torch.randn(32, generator=g)) if bias else None

    def forward(self, x):
        qd = torch.ops.quantized_decomposed
        xq = qd.quantize_per_tensor.default(x, 0.05, 0, -128, 127, torch.int8)
        xd = qd.dequantize_per_tensor.default(xq, 0.05, 0, -128, 127, torch.int8)
        wd = qd.dequantize_per_channel.default(self.wq, self.ws, self.wz, 0, -127, 127, torch.int8)
        return torch.relu(torch.nn.functional.linear(xd, wd, self.b))


@pytest.mark.parametrize("shape", [(4, 16), (4, 5, 16)], ids=["2d-gemm", "3d-matmul"])
def test_qdq_linear_runs_on_integer_kernels(tmp_path, shape):
    prog = capture(_QLinear().eval(), (torch.randn(*shape),), dynamic={"x": {0: "batch"}})
    art = lower(prog, "onnxruntime", tmp_path / "q")
    backend = art.manifest["backend"]
    assert backend["qdq"]["float_ops_on_dequantized"] == 0
    assert sum(backend["qdq"]["integer_ops"].values()) == 1, backend["qdq"]
    if len(shape) == 2:
        assert backend["qdq_gemm_bias_split"] == 1  # Gemm(DQ, DQ, float bias) -> QGemm + Add
    x = torch.randn(3, *shape[1:])
    with load(art.path) as runner:
        torch.testing.assert_close(runner(x)[0], prog(x)[0], atol=1e-4, rtol=1e-4)


def test_split_leaves_dequantized_bias_alone():
    """Near miss: a Gemm whose bias is itself dequantized is fused by ORT as is."""
    from graphopt.runtimes.onnxruntime import split_qdq_gemm_bias
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
        helper.make_node("DequantizeLinear", ["bq", "s", "z32"], ["bd"]),
        helper.make_node("Gemm", ["xd", "wd", "bd"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("xq", TensorProto.INT8, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph)
    assert split_qdq_gemm_bias(model) == 0
    assert [n.op_type for n in model.graph.node][-1] == "Gemm" and len(model.graph.node[-1].input) == 3


def test_damaged_optimized_model_is_refused(bert_artifact, tmp_path):
    """The stored ORT-optimized model is read instead of model.onnx, so it is covered like it:
    a flipped byte, a missing checksum or a path outside the folder is one ArtifactError line."""
    prog, art = bert_artifact
    assert art.manifest["backend"]["optimized"] == "model.optimized.onnx"
    d = tmp_path / "copy"
    shutil.copytree(art.path, d)
    feeds = prog.sample_inputs(batch=2, seq=8)
    torch.testing.assert_close(load(d)(*feeds)[0], prog(*feeds)[0], atol=1e-4, rtol=1e-4)  # near miss
    data = bytearray((d / "model.optimized.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "model.optimized.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as info:
        load(d)
    assert re.fullmatch(rf"onnxruntime \| {re.escape(str(d))}: checksum mismatch for model\.optimized\.onnx "
                        r"\(changed or corrupted since lowering\); re-lower the artifact", str(info.value))
    m = json.loads((d / "manifest.json").read_text())
    del m["files"]["model.optimized.onnx"]
    (d / "model.optimized.onnx").unlink()
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"model\.optimized\.onnx has no checksum in the manifest"):
        load(d)
    m["backend"]["optimized"] = "../model.optimized.onnx"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"names file '\.\./model\.optimized\.onnx', which is not inside"):
        load(d)


def test_fused_graph_that_fails_at_full_optimization_falls_back(tmp_path, monkeypatch):
    """GPT-2 captured raw (Conv1D as ``addmm`` between ``[b*s, k]`` reshapes, no canonicalization):
    onnxscript's MHA fusion takes the attention output's 2-D reshape for the [B, S, D] one and feeds a
    rank-3 tensor to a ``Gemm``. That graph loads at ORT's "basic" level and fails at "all"; the
    lowerer must check at the level runners use and keep the unfused graph, with the reason."""
    import graphopt.ir.capture as capture_module
    from graphopt.ir.layout import guard_layout_views
    from graphopt.rec.zoo import load_model

    zm = load_model("gpt-rec:tiny")
    monkeypatch.setattr(capture_module, "canonicalize", guard_layout_views)  # leave the addmm projections
    # export's all-zero-mask guard lands straight after SDPA in this graph (its heads merge to 2-D, not
    # [B, S, D]), where the MHA fusion no longer matches; without it the graph keeps the form that trips it
    monkeypatch.setattr("graphopt.runtimes.onnx_export.zero_fully_masked_rows", lambda gm: 0)
    prog = zm.capture()
    assert prog.op_histogram()["aten.addmm.default"] == 8
    art = lower(prog, "onnxruntime", tmp_path / "gpt")
    skipped = art.manifest["backend"]["fusions"].get("skipped", "")
    assert "Gemm" in skipped and "rank 2" in skipped, art.manifest["backend"]["fusions"]
    inputs = zm.make_inputs(batch=3, seq=11, seed=2)
    with load(art.path) as runner:  # at the default level ("all")
        (out,) = runner(*inputs.values())
    torch.testing.assert_close(out, zm.module(**inputs).detach(), atol=1e-4, rtol=1e-4)


def test_dynamic_int8_lowers_with_dynamic_quantize_linear(program, tmp_path):
    """Was: every quantize-int8-dynamic Program failed ONNX export ('No ONNX function found for
    quantized_decomposed.choose_qparams.tensor'); the lowerer now passes graphopt's QDQ
    translations for it: each activation's qparams come from ONNX DynamicQuantizeLinear."""
    import graphopt

    q, _ = graphopt.optimize(program("dlrm:tiny"), "quantize-int8-dynamic")
    art = lower(q, "onnxruntime", tmp_path / "dyn")
    assert art.manifest["backend"]["exported_ops"].get("DynamicQuantizeLinear", 0) >= 1, art.manifest["backend"]
    x = q.sample_inputs(batch=6, seed=4)
    with load(art.path) as runner:
        (got,) = runner(*x)
    # ORT's integer GEMMs vs the Program's fake-quant fp32 math (the pass itself is held to 0.25)
    torch.testing.assert_close(got, q(*x)[0], atol=0.1, rtol=0.1)
    # near miss: a float Program exports without any quantize op
    plain = lower(program("dlrm:tiny"), "onnxruntime", tmp_path / "fp32")
    assert "DynamicQuantizeLinear" not in plain.manifest["backend"]["exported_ops"]


def test_int8_llama_lowers_with_its_transformer_fusions(tmp_path):
    """Was: onnxscript's transformer fusions edited the exported proto they were handed (an IR read from a
    proto shares it) and left it with a dangling input; the lowerer's fallback then saved that graph, and
    every Llama-, Mistral- or Qwen2-style int8 artifact failed to load ("Invalid model. Node input 'val_66'
    is not a graph input, initializer, or output of a previous node"). The fusions now get a copy."""
    import graphopt
    from tests.passes import int8_models

    model, example, _ = int8_models.hf_scorer("llama")
    seq = {0: "batch", 1: "seq"}
    prog = capture(model, dict(zip(("input_ids", "attention_mask"), example)),
                   dynamic={"input_ids": seq, "attention_mask": seq})
    batches = int8_models._token_batches(96, 8, 12)
    q, _ = graphopt.optimize(prog, "O2,quantize-int8{max_drop=0}", calibration_data=[batches(s) for s in range(1, 5)])
    art = lower(q, "onnxruntime", tmp_path / "llama")
    backend = art.manifest["backend"]
    assert "skipped" not in backend["fusions"] and backend["fusions"].get("rotary_embedding", 0) > 0, backend["fusions"]
    assert sum(backend["qdq"]["integer_ops"].values()) > 0, backend["qdq"]
    x = int8_models._token_batches(96, 3, 7)(40)
    with load(art.path) as runner:
        (got,) = runner(*x)
    # ORT's integer GEMMs against the Program's fake-quant fp32 math (the pass itself is held to 0.25)
    want = q(*x)[0]
    torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0.05)


def test_weight_only_int8_keeps_fp32_activations(tmp_path):
    """Was: ORT fused DequantizeLinear -> MatMul into MatMulNBits at its default accuracy level 4, which
    quantizes the activations to int8 at run time: 0.0099 off the weight-only Program (3-D input)."""
    torch.manual_seed(0)
    prog = capture(torch.nn.Linear(16, 32, bias=False).eval(), (torch.randn(2, 5, 16),))
    weights_only, _ = optimize(prog, "quantize-int8-weights")
    x = torch.randn(3, 5, 16)
    with load(lower(weights_only, "onnxruntime", tmp_path / "w8").path) as runner:
        torch.testing.assert_close(runner(x)[0], weights_only(x)[0], atol=1e-5, rtol=1e-5)
