"""Static TensorRT check on our exported graphs and on hand-built near misses."""

from __future__ import annotations

import json

import pytest
import torch
from graphopt.runtimes.tensorrt_check import MAX_TOPK, check_onnx

from graphopt.cli import main
from graphopt.process import quiet_backends

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _errors(model):
    return [f for f in check_onnx(model) if f.severity == "error"]


def _export(program):
    from graphopt.runtimes.onnx_export import export_onnx

    with quiet_backends():
        return export_onnx(program)


def test_bert_export_is_compatible_dlrm_loop_is_not(program):
    bert = check_onnx(_export(program("bert4rec:tiny")))
    assert [f for f in bert if f.severity == "error"] == []
    assert {f.rule for f in bert} == {"int64-input"}
    dlrm = _errors(_export(program("dlrm:tiny")))  # embedding_bag exports as Loop + Sequence ops
    assert {f.op for f in dlrm} >= {"SequenceEmpty", "ConcatFromSequence"}
    assert all(f.rule == "unsupported-op" for f in dlrm)


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _topk(k):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 10000])
    outs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("i", TensorProto.INT64, None)]
    k_init = numpy_helper.from_array(torch.tensor([k]).numpy(), "k")
    return _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)], [x], outs, [k_init])


def test_topk_limit():
    assert [f.rule for f in _errors(_topk(MAX_TOPK + 1))] == ["topk"]
    assert _errors(_topk(100)) == []  # near miss


def test_topk_with_runtime_k_is_an_error():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 100])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    outs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("i", TensorProto.INT64, None)]
    model = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)], [x, k], outs)
    assert [f.rule for f in _errors(model)] == ["constant-input"]


def _qdq(zero_point, dtype=TensorProto.INT8):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    np_dtype = {TensorProto.INT8: "int8", TensorProto.UINT8: "uint8"}[dtype]
    inits = [numpy_helper.from_array(torch.tensor(0.1).numpy(), "s"),
             numpy_helper.from_array(torch.tensor(zero_point).numpy().astype(np_dtype), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    return _model(nodes, [x], [y], inits)


def test_asymmetric_or_uint8_qdq_is_an_error():
    assert {f.rule for f in _errors(_qdq(3))} == {"qdq"}
    assert {f.rule for f in _errors(_qdq(0, TensorProto.UINT8))} == {"qdq"}
    assert _errors(_qdq(0)) == []  # near miss: symmetric int8


def test_int64_matmul_is_an_error_float_is_not():
    def mm(t):
        a = helper.make_tensor_value_info("a", t, [2, 3])
        b = helper.make_tensor_value_info("b", t, [3, 2])
        y = helper.make_tensor_value_info("y", t, [2, 2])
        return _model([helper.make_node("MatMul", ["a", "b"], ["y"])], [a, b], [y])

    assert [f.rule for f in _errors(mm(TensorProto.INT64))] == ["unsupported-type"]
    assert _errors(mm(TensorProto.FLOAT)) == []


def test_cli_exit_codes(tmp_path, capsys):
    model = _qdq(3)
    onnx.save(model, str(tmp_path / "bad.onnx"))
    onnx.save(_qdq(0), str(tmp_path / "good.onnx"))
    assert main(["check-tensorrt", str(tmp_path / "bad.onnx")]) == 1
    out = capsys.readouterr().out
    assert "not TensorRT-compatible" in out
    assert ("fix: TensorRT takes symmetric int8 Q/DQ only; quantize with -p 'quantize-int8{activations=int8}' "
            "(symmetric int8, zero point 0)") in out.splitlines()
    assert main(["check-tensorrt", str(tmp_path / "good.onnx")]) == 0
    assert "fix:" not in capsys.readouterr().out  # near miss: nothing to fix
    assert main(["check-tensorrt", str(tmp_path / "nothing-here")]) == 2


def test_cli_says_dynamic_int8_never_runs_on_tensorrt(tmp_path, capsys):
    """quantize-int8-dynamic exports DynamicQuantizeLinear, which the parser never imports."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    outs = [helper.make_tensor_value_info("q", TensorProto.UINT8, None),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("z", TensorProto.UINT8, None)]
    onnx.save(_model([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], [x], outs),
              str(tmp_path / "dyn.onnx"))
    assert main(["check-tensorrt", str(tmp_path / "dyn.onnx"), "--json"]) == 1
    fix = json.loads(capsys.readouterr().out)["fix"]
    assert fix.startswith("quantize-int8-dynamic can never run on TensorRT (no DynamicQuantizeLinear); "
                          "quantize with -p 'quantize-int8{activations=int8}'")
