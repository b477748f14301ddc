"""quantize-int8: QDQ structure, numerics within the declared tolerance, save/load,
ONNX Runtime integer kernels, Inductor int8 kernels, calibration methods, accuracy guard."""

from __future__ import annotations

import pytest
import torch
from graphopt.passes.quantize_int8 import QuantizeInt8

import graphopt
from graphopt.errors import GraphoptError, PassOptionError
from graphopt.hardware import has_bf16_kernels
from graphopt.ir.fx import fetch_attr
from graphopt.ir.program import Program
from graphopt.metrics import agreement, cosine, drift, ndcg_at_k
from tests.models import ActivationMatmul
from tests.passes._helpers import assert_equivalent
from tests.passes._precision import INTEGER_KERNELS, calibration, ort_optimized_ops

TOL = QuantizeInt8.tolerance  # 0.25, atol = rtol
Q = "quantized_decomposed.quantize_per_tensor.default"
DQ = "quantized_decomposed.dequantize_per_tensor.default"
DQC = "quantized_decomposed.dequantize_per_channel.default"


def _int8_weights(p: Program) -> list[torch.Tensor]:
    return [t for t in p.parameter_tensors().values() if t.dtype == torch.int8]


@pytest.fixture(scope="module")
def bert_int8(zoo, program):
    # guard off: every linear int8, so the structure is exact
    return graphopt.optimize(program("bert4rec:tiny"), "quantize-int8{max_drop=0}",
                             calibration_data=calibration(zoo("bert4rec:tiny")))


def test_structure_bert4rec(bert_int8, program):
    q, report = bert_int8
    ops = q.op_histogram()
    # 13 linears (6 per layer x 2 + transform); q/k/v share one input: 9 activations
    assert ops[DQC] == 13 and ops["aten.linear.default"] == 13
    assert ops[Q] == 9 and ops[DQ] == 9
    assert report.passes[0].stats == {"linear": 13, "activation-qdq": 9}
    assert len(_int8_weights(q)) == 13
    # the fp32 linear weights are gone (dropped as unused); the head reads a slice of the
    # item table (not a constant before fold-constants), so it stays float
    assert q.parameter_bytes() < program("bert4rec:tiny").parameter_bytes()
    assert [d for d in report.passes[0].declined if "matmul" in d] == ["matmul: matmul of computed operands stays float"]
    for node in q.gm.graph.nodes:
        if node.target is torch.ops.quantized_decomposed.quantize_per_tensor.default:
            assert node.args[-1] == torch.uint8 and (node.args[3], node.args[4]) == (0, 255)


def test_numerics_and_second_shape(bert_int8, program):
    q, report = bert_int8
    ref = program("bert4rec:tiny")
    assert_equivalent(ref, q, TOL, shapes=((16, None), (1, 8)))
    d = drift(q(*ref.sample_inputs(batch=32, seed=12)), ref(*ref.sample_inputs(batch=32, seed=12)))
    assert d["cosine"] > 0.999 and d["top10_overlap"] >= 0.9


def test_save_load_round_trip(bert_int8, tmp_path):
    q, _ = bert_int8
    loaded = Program.load(q.save(tmp_path / "int8.pt2"))
    assert loaded.op_histogram()[DQC] == 13 and len(_int8_weights(loaded)) == 13
    x = q.sample_inputs(batch=3, seed=5)
    torch.testing.assert_close(loaded(*x), q(*x), atol=1e-6, rtol=1e-6)


def test_onnx_qdq_and_ort_integer_kernels_3d(bert_int8, tmp_path):
    q, _ = bert_int8
    exported, optimized, sess = ort_optimized_ops(q, tmp_path, translations=False)  # plain torch.onnx.export
    assert exported["QuantizeLinear"] == 9 and exported["DequantizeLinear"] >= 9 + 13
    assert optimized["MatMulIntegerToFloat"] == 13, optimized
    x = q.sample_inputs(batch=2, seed=5)
    out = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), x)})[0]
    torch.testing.assert_close(torch.from_numpy(out), q(*x)[0], atol=1e-3, rtol=1e-3)


def test_ort_integer_kernels_rank2_dlrm(zoo, program, tmp_path):
    # rank-2 linears: the exporter writes Gemm, which ORT keeps float; graphopt.qdq's
    # translations write MatMul(+Add) and the lowerer disables ORT's MatMulAddFusion
    # guard off: every linear int8 (the guard may keep one float on these inputs)
    q, _ = graphopt.optimize(program("dlrm:tiny"), "quantize-int8{max_drop=0}",
                             calibration_data=calibration(zoo("dlrm:tiny")))
    exported, optimized, _ = ort_optimized_ops(q, tmp_path)
    assert exported["QuantizeLinear"] == 4
    assert sum(optimized[k] for k in INTEGER_KERNELS) == 4, optimized
    assert "Gemm" not in optimized and "FusedGemm" not in optimized


def test_entropy_and_minmax_pick_different_scales(zoo, program):
    calib = calibration(zoo("dlrm:tiny"), n=3, batch=32)
    scales = {}
    for method in ("minmax", "entropy"):
        _, report = graphopt.optimize(program("dlrm:tiny"), f"quantize-int8{{calibration={method}}}",
                                      calibration_data=calib)
        scales[method] = {d["node"]: d["act_scale"] for d in report.passes[0].details}
    # post-ReLU/BN activations are skewed: KL clips their tail, so some scales shrink
    differ = [n for n in scales["minmax"] if scales["entropy"][n] < 0.99 * scales["minmax"][n]]
    assert differ, "entropy calibration must not collapse to minmax"
    assert all(scales["entropy"][n] <= scales["minmax"][n] * (1 + 1e-6) for n in scales["minmax"])


def test_accuracy_guard_keeps_sensitive_layers_float(zoo, program):
    calib = calibration(zoo("dlrm:tiny"), n=4, batch=32)
    q, report = graphopt.optimize(program("dlrm:tiny"), "quantize-int8{max_drop=0.000001 metric=cosine}",
                                  calibration_data=calib)
    rec = report.passes[0]
    kept = [d for d in rec.details if not d["quantized"]]
    assert kept and all("accuracy guard" in d["reason"] and "sensitivity" in d for d in kept)
    assert rec.stats["kept-float"] == len(kept) and rec.stats.get("linear", 0) == 4 - len(kept)
    # the kept layers really are float in the graph, the others read dequantized int8 weights
    linears = {n.name: n for n in q.gm.graph.nodes if n.target is torch.ops.aten.linear.default}
    for d in rec.details:
        w = linears[d["node"]].args[1]
        dequantized = w.op == "call_function" and "dequantize" in str(w.target)
        assert dequantized is d["quantized"], d["node"]
    assert q.op_histogram().get(DQC, 0) == 4 - len(kept)
    # the final drop on the held-out batch (the last of 4) is within max_drop, measured on the real graph
    ref = program("dlrm:tiny")
    with torch.no_grad():
        final = 1.0 - agreement("cosine", tuple(q(*calib[-1])), tuple(ref(*calib[-1])))
    assert final <= 0.000001 + 1e-6, final
    assert any("accuracy guard" in n for n in rec.notes)
    # a generous budget keeps everything int8
    _, loose = graphopt.optimize(program("dlrm:tiny"), "quantize-int8{max_drop=0.5 metric=topk_overlap}",
                                 calibration_data=calib)
    assert loose.passes[0].stats == {"linear": 4, "activation-qdq": 4}


def test_auto_calibration_keeps_the_method_leaving_least_work_float(zoo, program):
    from graphopt.passlib.costs import node_flops

    calib = calibration(zoo("dlrm:tiny"), n=4, batch=32)
    guard = "max_drop=0.000001 metric=cosine"
    ref = program("dlrm:tiny")
    q, report = graphopt.optimize(ref, f"quantize-int8{{{guard}}}", calibration_data=calib)
    rec = report.passes[0]
    note = next(n for n in rec.notes if n.startswith("calibration=auto chose "))
    chosen = note.split()[2]
    # each method as the note states it = a run of that method alone (same data, same guard)
    flops = {n.name: node_flops(n) for n in ref.gm.graph.nodes if n.target is torch.ops.aten.linear.default}
    shares, runs = {}, {}
    for method in ("minmax", "entropy", "mse", "percentile"):
        _, r = graphopt.optimize(ref, f"quantize-int8{{calibration={method} {guard}}}", calibration_data=calib)
        runs[method] = [(d["node"], d["act_scale"], d["quantized"]) for d in r.passes[0].details]
        shares[method] = 100.0 * sum(flops[n] for n, _, on in runs[method] if not on) / sum(flops.values())
        assert f"{method}: {shares[method]:.1f}% of the GEMM FLOPs float" in note, (method, note)
    assert len({tuple(r) for r in runs.values()}) > 1, "the methods must differ here, or this checks nothing"
    assert shares[chosen] <= min(shares.values()) + 2.0
    # auto's ranges and int8 layers are exactly the chosen method's, and the graph has them
    assert [(d["node"], d["act_scale"], d["quantized"]) for d in rec.details] == runs[chosen]
    assert q.op_histogram().get(DQC, 0) == sum(on for _, _, on in runs[chosen])
    assert_equivalent(ref, q, 1.0 if chosen == "entropy" else TOL, shapes=((16, None), (3, None)))


def test_auto_calibration_without_the_guard_is_minmax(zoo, program):
    calib = calibration(zoo("bert4rec:tiny"), n=2)
    _, auto = graphopt.optimize(program("bert4rec:tiny"), "quantize-int8{max_drop=0}", calibration_data=calib)
    _, mm = graphopt.optimize(program("bert4rec:tiny"), "quantize-int8{max_drop=0 calibration=minmax}",
                              calibration_data=calib)
    assert [d["act_scale"] for d in auto.passes[0].details] == [d["act_scale"] for d in mm.passes[0].details]
    assert not any(n.startswith("calibration=auto") for n in auto.passes[0].notes)


def test_validation_data_holds_the_users_metric_on_the_real_graph(zoo, program):
    from graphopt.fidelity_bar import FIDELITY_BAR

    ref = program("bert4rec:tiny")
    calib = calibration(zoo("bert4rec:tiny"), n=4, batch=16)
    batches = [ref.sample_inputs(batch=16, seed=300 + i) for i in range(4)]
    with torch.no_grad():  # each row's target: the float model's 10th item, on the edge of its top 10
        targets = torch.cat([ref(*b)[0].topk(10, dim=-1).indices[:, -1] for b in batches])
    calls = []

    def validation(fn):
        calls.append(fn)
        with torch.no_grad():
            scores = torch.cat([torch.as_tensor(fn(*b)[0]) for b in batches])
        return {"ndcg@10": ndcg_at_k(scores, targets, 10)}

    loose = "quantize-int8{calibration=minmax metric=topk_overlap max_drop=0.5}"  # alone: every layer int8
    q0, r0 = graphopt.optimize(ref, loose, calibration_data=calib)
    q1, r1 = graphopt.optimize(ref, loose, calibration_data=calib, validation=validation)
    float_metrics = validation(ref)
    assert r0.passes[0].stats["linear"] == 13
    # without validation data the user's metric is lost; with it, the guard keeps layers float until it holds
    assert not FIDELITY_BAR.check(validation(q0), float_metrics)[0], "this setting must lose the metric"
    assert FIDELITY_BAR.check(validation(q1), float_metrics)[0]
    kept = r1.passes[0].stats.get("kept-float", 0)
    assert 0 < kept <= 13 and r1.passes[0].stats.get("linear", 0) == 13 - kept
    assert q1.op_histogram().get(DQC, 0) == 13 - kept
    assert any(n.startswith("accuracy guard: validation data checked") for n in r1.passes[0].notes)
    assert_equivalent(ref, q1, TOL, shapes=((8, None), (2, 24)))
    # the guard off: validation data is not read
    calls.clear()
    graphopt.optimize(ref, "quantize-int8{max_drop=0}", calibration_data=calib, validation=validation)
    assert not calls


def test_no_layer_int8_leaves_the_program_as_it_came(zoo, program):
    # O2 fuses linear+gelu into _addmm_activation, which quantize-int8 rewrites into linear to
    # quantize it; a user metric no int8 layer holds (it moves 0.5% at 5e-9 of score) keeps every layer float, and
    # then the Program must be O2's unchanged, op for op and weight for weight
    o2, _ = graphopt.optimize(program("bert4rec:tiny"), "O2", verify_each=False)
    assert o2.op_histogram().get("aten._addmm_activation.default", 0) == 3
    code, weights = o2.gm.code, {k: v.clone() for k, v in o2.parameter_tensors().items()}
    probe = o2.sample_inputs(batch=8, seed=5)
    with torch.no_grad():
        want = o2(*probe)[0]

    def validation(fn):
        with torch.no_grad():
            return {"exactness": 1.0 - 1e6 * float((torch.as_tensor(fn(*probe)[0]) - want).abs().max())}

    q, report = graphopt.optimize(o2, "quantize-int8", calibration_data=calibration(zoo("bert4rec:tiny"), n=4),
                                  validation=validation)
    rec = report.passes[-1]
    assert rec.modified is False and rec.stats == {"kept-float": 11}
    assert len(rec.declined) == 11 and not any(d["quantized"] for d in rec.details)
    assert any(n == "no layer int8 (all 11 kept float): the Program is left as it came" for n in rec.notes)
    assert not any(n.startswith("as linear: ") for n in rec.notes)
    assert q.gm.code == code and q.parameter_tensors().keys() == weights.keys()
    assert all(torch.equal(t, weights[k]) for k, t in q.parameter_tensors().items())
    assert_equivalent(o2, q, 0.0, shapes=((8, None), (2, 24)))  # exact: the same graph
    with torch.no_grad():
        assert torch.equal(q(*probe)[0], want)


def test_skip_and_near_miss():
    prog = graphopt.capture(ActivationMatmul(), (torch.randn(2, 3, 4), torch.randn(2, 5, 4)))
    out, report = graphopt.optimize(prog, "quantize-int8", calibration_data=[prog.sample_inputs(seed=1)])
    assert report.passes[0].modified is False and report.passes[0].stats == {}
    assert any("stays float" in d for d in report.passes[0].declined)


def test_skip_pattern(zoo, program):
    q, report = graphopt.optimize(program("bert4rec:tiny"),
                                  "quantize-int8{max_drop=0 skip=*.intermediate.dense,linear_12}",
                                  calibration_data=calibration(zoo("bert4rec:tiny"), n=2))
    assert report.passes[0].stats["linear"] == 13 - 3
    assert sum("matched skip" in d for d in report.passes[0].declined) == 3


def test_needs_calibration_data_and_checks_options(program):
    with pytest.raises(GraphoptError, match="calibration data"):
        graphopt.optimize(program("dlrm:tiny"), "quantize-int8")
    with pytest.raises(PassOptionError, match="bins"):
        QuantizeInt8(calibration="entropy", bins=1024)


def test_calibration_dicts_bind_by_input_name(zoo, program):
    """Was: a dict batch was read in its own key order, so batches written {"attention_mask": ..,
    "input_ids": ..} calibrated on swapped inputs (top-10 0.93 on fresh rows, nothing reported) and
    unknown names passed silently. Now they bind by name; a wrong name is a one-line error."""
    prog, zm = program("bert-cls:tiny"), zoo("bert-cls:tiny")
    batches = calibration(zm)  # positional, in the Program's order
    swapped = [dict(reversed(list(zip(prog.input_names, b)))) for b in batches]
    assert list(swapped[0]) == prog.input_names[::-1]
    plain, _ = graphopt.optimize(prog, "quantize-int8{max_drop=0}", calibration_data=batches)
    named, _ = graphopt.optimize(prog, "quantize-int8{max_drop=0}", calibration_data=swapped)
    x = zm.make_inputs(batch=4, seed=11)
    assert torch.equal(plain(*x.values())[0], named(*x.values())[0])  # same scales: same Program
    # near miss: the same tensors in swapped positions do calibrate a different Program
    crossed, _ = graphopt.optimize(prog, "quantize-int8{max_drop=0}", calibration_data=[b[::-1] for b in batches])
    assert not torch.equal(plain(*x.values())[0], crossed(*x.values())[0])
    wrong = [{"ids": b[0], "mask": b[1]} for b in batches]
    with pytest.raises(GraphoptError, match=r"calibration_data\[0\]: unknown input 'ids'; the model's inputs are"):
        graphopt.optimize(prog, "quantize-int8{max_drop=0}", calibration_data=wrong)


def test_reduce_range_keeps_weights_7_bit_and_runs_on_ort(zoo, program, tmp_path):
    """7-bit weights (|q| <= 64: u8 x s8 pair sums fit int16 on CPUs without VNNI/AMX)."""
    ref = program("dlrm:tiny")
    q, report = graphopt.optimize(ref, "quantize-int8{reduce_range=true max_drop=0}", calibration_data=calibration(zoo("dlrm:tiny")))
    weights = _int8_weights(q)
    assert len(weights) == 4 and all(int(w.min()) >= -64 and int(w.max()) <= 63 for w in weights)
    assert {d["weight_bits"] for d in report.passes[0].details} == {7}
    _, full = graphopt.optimize(ref, "quantize-int8{reduce_range=false}", calibration_data=calibration(zoo("dlrm:tiny")))
    assert {d["weight_bits"] for d in full.passes[0].details} == {8}
    assert_equivalent(ref, q, TOL, shapes=((8, None),))
    _, _, sess = ort_optimized_ops(q, tmp_path)
    x = q.sample_inputs(batch=6, seed=2)
    out = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), x)})[0]
    torch.testing.assert_close(torch.from_numpy(out), q(*x)[0], atol=1e-3, rtol=1e-3)


def test_reduce_range_auto_follows_the_cpu(zoo, program, monkeypatch):
    # capping oneDNN below VNNI makes its int8 kernels saturate as on a pre-VNNI CPU: auto must pick 7 bits
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    _, report = graphopt.optimize(program("dlrm:tiny"), "quantize-int8", calibration_data=calibration(zoo("dlrm:tiny")))
    rec = report.passes[0]
    assert {d["weight_bits"] for d in rec.details} == {7}
    assert any("reduce_range=auto" in n and "7 bits" in n for n in rec.notes)


def test_onnxruntime_lowering_fuses_attention_and_keeps_integer_kernels(bert_int8, zoo, program, tmp_path):
    # O2 (fused q/k/v): attention and skip-layernorm fused, no FusedMatMul, and every
    # quantized linear still an integer kernel in ORT's optimized graph
    q, _ = graphopt.optimize(program("bert4rec:tiny"), "O2,quantize-int8{max_drop=0}",
                             calibration_data=calibration(zoo("bert4rec:tiny")))
    backend = graphopt.lower(q, "onnxruntime", tmp_path / "o2").manifest["backend"]
    assert backend["ops"]["com.microsoft.MultiHeadAttention"] == 2, backend["ops"]
    assert backend["ops"]["com.microsoft.SkipLayerNormalization"] == 4, backend["ops"]
    linears = q.op_histogram()[DQC]
    assert sum(backend["qdq"]["integer_ops"].values()) == linears and backend["qdq"]["float_ops_on_dequantized"] == 0
    x = tuple(zoo("bert4rec:tiny").make_inputs(batch=3, seed=5).values())
    with graphopt.load(tmp_path / "o2") as runner:
        torch.testing.assert_close(runner(*x)[0], q(*x)[0], atol=2e-2, rtol=2e-2)
    # near miss: separate q/k/v linears fuse into MultiHeadAttention's float projections, which
    # would lose integer kernels: the lowerer keeps the unfused graph and says why
    near, _ = bert_int8
    backend = graphopt.lower(near, "onnxruntime", tmp_path / "near").manifest["backend"]
    assert backend["fusions"] == {"skipped": "the fused graph ran fewer integer kernels"}
    assert sum(backend["qdq"]["integer_ops"].values()) == 13


def test_mixed_bf16_form(zoo, program):
    """int8-mixed-bf16: quantized linears read bf16 dequantized operands and write bf16, carried
    into attention; layer norms and outputs stay fp32; the next quantize reads bf16 itself."""
    ref = program("bert4rec:tiny")
    q, report = graphopt.optimize(ref, "O2,quantize-int8{max_drop=0 mixed=bf16}",
                                  calibration_data=calibration(zoo("bert4rec:tiny")))
    stats = report.passes[-1].stats
    nodes = list(q.gm.graph.nodes)
    linears = [n for n in nodes if n.target is torch.ops.aten.linear.default]
    assert stats["bf16-linear"] == len(linears) == q.op_histogram()[DQC] and stats["bf16-sdpa"] == 2
    # on a CPU where oneDNN has no bf16 kernels (AVX2 only) the pass says this form runs reference code
    warned = any("oneDNN has no bf16 kernels for this CPU" in n for n in report.passes[-1].notes)
    assert warned is not has_bf16_kernels(), report.passes[-1].notes

    def dtype(n):
        return n.meta["val"].dtype

    for lin in linears:
        x, w = lin.args[:2]
        assert x.target is torch.ops.aten._to_copy.default and str(x.args[0].target) == DQ
        assert w.target is torch.ops.aten._to_copy.default and str(w.args[0].target) == DQC
        assert dtype(lin) == torch.bfloat16
    for n in nodes:
        if n.target is torch.ops.aten.scaled_dot_product_attention.default:
            assert all(dtype(a) == torch.bfloat16 for a in n.args[:3])
        if n.target is torch.ops.aten.layer_norm.default:
            assert dtype(n.args[0]) == torch.float32
    bf16_q = [n for n in nodes if str(n.target) == Q and dtype(n.args[0]) == torch.bfloat16]
    gelu_q = [n for n in bf16_q if n.args[0].args[0].target is torch.ops.aten.gelu.default]
    # per layer: ffn up -> gelu -> q (fuses into one qlinear, uint8 out) and attention -> q
    assert len(gelu_q) == 2 and len(bf16_q) == 4
    x = tuple(zoo("bert4rec:tiny").make_inputs(batch=16, seed=21).values())
    out = q(*x)[0]
    assert out.dtype == torch.float32
    # bf16 GEMM outputs and attention on top of int8: stated tolerance vs fp32
    assert cosine(out, ref(*x)[0]) > 0.999
    # near miss: with every layer kept float nothing is carried in bf16
    _, none = graphopt.optimize(ref, "quantize-int8{mixed=bf16 skip=*}", calibration_data=calibration(zoo("bert4rec:tiny")))
    assert none.passes[-1].modified is False and "bf16-linear" not in none.passes[-1].stats


def test_mixed_bf16_kept_layers_run_as_the_guard_found_and_the_program_holds_its_target(zoo, program):
    """int8-mixed-bf16: a layer the guard keeps out of int8 runs a bf16 GEMM (bf16 weight and bias
    constants, no per-call cast of the weight) where the guard found the target holds so, else fp32;
    and the rewritten Program itself (attention in bf16, which the emulator leaves fp32) holds the
    guard's target on the held-out batch, recomputed here against the float Program."""
    calib = calibration(zoo("bert4rec:tiny"), n=4, batch=16)  # the guard holds out the last batch
    ref = program("bert4rec:tiny")
    q, report = graphopt.optimize(ref, "O2,quantize-int8{mixed=bf16 metric=cosine max_drop=0.00001 headroom=0}",
                                  calibration_data=calib)
    rec = report.passes[-1]
    kept = {d["node"]: d["kept_as"] for d in rec.details if not d["quantized"]}
    assert kept and set(kept.values()) <= {"bf16", "fp32"} and rec.stats["kept-float"] == len(kept)
    assert rec.stats["bf16-float-linear"] == sum(v == "bf16" for v in kept.values())
    assert rec.stats["bf16-linear"] == q.op_histogram()[DQC] == len(rec.details) - len(kept)
    assert any("the rewritten Program" in n for n in rec.notes)
    nodes = {n.name: n for n in q.gm.graph.nodes}
    for name, kind in kept.items():
        lin = nodes[name]
        x, *constants = [a for a in lin.args if a is not None]
        assert constants and all(c.op == "get_attr" for c in constants)
        if kind == "bf16":
            assert lin.meta["val"].dtype == torch.bfloat16
            assert x.target is torch.ops.aten._to_copy.default and x.kwargs["dtype"] == torch.bfloat16
            assert all(fetch_attr(q.gm, c.target).dtype == torch.bfloat16 for c in constants)
        else:
            assert lin.meta["val"].dtype == torch.float32
            assert all(fetch_attr(q.gm, c.target).dtype == torch.float32 for c in constants)
    with torch.no_grad():
        held_out = agreement("cosine", q(*calib[-1]), ref(*calib[-1]))
    assert held_out >= 1 - 0.00001 - 1e-12  # the target: cosine >= 1 - max_drop on the held-out rows
    # near miss: a layer the user skips stays fp32 (skip means float, not bf16)
    q2, r2 = graphopt.optimize(ref, "O2,quantize-int8{mixed=bf16 max_drop=0 skip=*transform*}",
                               calibration_data=calib)
    # the skipped transform stays fuse-linear-act's fp32 linear+gelu (as_linears leaves it)
    skipped = [n for n in q2.gm.graph.nodes if n.target is torch.ops.aten._addmm_activation.default]
    assert len(skipped) == 1 and skipped[0].meta["val"].dtype == torch.float32
    assert all(a.meta["val"].dtype == torch.float32 for a in skipped[0].args[:3])
    assert r2.passes[-1].stats.get("bf16-float-linear", 0) == 0
    # numerics: bf16 GEMMs on int8 vs fp32, stated tolerance (cosine of the scores)
    x = q.sample_inputs(batch=8, seed=9)
    assert cosine(q(*x)[0], ref(*x)[0]) > 0.999
