"""Shared helpers of the precision-pass tests: calibration data, ONNX Runtime's optimized graph."""

from __future__ import annotations

import collections
from pathlib import Path

import torch

INTEGER_KERNELS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul"}


def calibration(zoo_model, n: int = 4, batch: int = 8) -> list[tuple[torch.Tensor, ...]]:
    """Seeded batches distinct from the example inputs (seed 0) and the checks (seed 11+)."""
    return [tuple(zoo_model.make_inputs(batch=batch, seed=s).values()) for s in range(100, 100 + n)]


def ort_optimized_ops(program, tmp_path: Path, translations: bool = True):
    """(ops of the exported ONNX, ops of ORT's saved optimized graph, an ORT session)."""
    import onnx
    import onnxruntime as ort
    from graphopt.runtimes.onnx_export import ORT_DISABLED_OPTIMIZERS, qdq_translations

    table = qdq_translations() if translations else None
    onx = torch.onnx.export(program.export(), dynamo=True, custom_translation_table=table, verbose=False)
    path = tmp_path / "model.onnx"
    onx.save(str(path))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "model.opt.onnx")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS))
    exported = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    optimized = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return exported, optimized, sess
