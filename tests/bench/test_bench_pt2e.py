"""The torchao PT2E static int8 peers (X86InductorQuantizer, int8 and
int8-mixed-bf16) run through the harness on bert4rec:tiny: status, fidelity
against eager within the int8 tolerance, and oneDNN int8 kernels in the code
Inductor generated. Near misses: nothing to quantize, unusable calibration
data. Timing numbers are never asserted. The int8-mixed-bf16 peer runs where
the CPU has bf16 GEMM kernels, where the bench's defaults hold it (elsewhere
oneDNN's reference bf16 kernels cost ~10 s here and the bench leaves it out)."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import graphopt
from graphopt.hardware import has_bf16_kernels

PT2E = ["torchao-pt2e-int8"] + (["torchao-pt2e-int8-bf16"] if has_bf16_kernels() else [])
SHAPE = "b12_s16"
#: static int8 (per-tensor activations, per-channel weights): the stated tolerance
MIN_COSINE, MIN_TOP10 = 0.99, 0.8

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def pt2e(zoo):
    """One bench run with both PT2E peers and nothing else compiled by Inductor,
    so every generated module is one of theirs (int8 peer first)."""
    model = zoo("bert4rec:tiny")
    report, codes = run_and_get_code(
        graphopt.bench, model, ["none"], ["eager"], peers=PT2E,
        batch_sizes=[12], seq_lens=[16], quick=True, memory=False,
    )
    return report, codes


def _row(report, name: str) -> dict:
    return next(r for r in report.rows(SHAPE) if r["variant"] == name)


def _qlinear_out_dtypes(code: str) -> list[str]:
    """Output dtype of every oneDNN int8 linear call (the one dtype among its arguments)."""
    calls = [line for line in code.splitlines() if "onednn.qlinear_pointwise" in line]
    return [m.group(1) if (m := re.search(r", (torch\.(?:float32|bfloat16|uint8)), ", c)) else c for c in calls]


def test_pt2e_peers_run_and_match_eager_within_int8_tolerance(pt2e):
    report, _ = pt2e
    for name in PT2E:
        v = report.variant(f"peer: {name}")
        assert v["status"] == "ok", v["reason"]
        assert v["timings"]["export_s"] > 0 and v["timings"]["quantize_s"] > 0
        assert "dynamic-shape export" in v["notes"]
        assert 0 < v["size_bytes"] < report.variant("eager")["size_bytes"]  # int8 weights, fp32 ones dropped
        row = _row(report, f"peer: {name}")
        assert row["status"] == "ok", row.get("reason")
        acc = row["accuracy"]
        assert acc["ranked_over"] == "items"
        assert acc["cosine"] > MIN_COSINE and acc["topk_overlap"] >= MIN_TOP10
        assert acc["max_abs"] > 0  # really quantized: not bit-equal to eager


def test_pt2e_calibrates_where_graphopt_int8_does(pt2e):
    """No calibration_data given: the bench draws held-out batches of its own inputs once and
    hands the same batches to graphopt's int8 pipelines and to the PT2E peers."""
    report, _ = pt2e
    assert any(n.startswith("calibration (int8 pipelines, PT2E peers):") and "seeds 1000+" in n
               for n in report.notes), report.notes
    for name in PT2E:
        notes = report.variant(f"peer: {name}")["notes"]
        assert "calibrated on 4 batches: calibration_data" in notes


def test_inductor_code_runs_onednn_int8_linears(pt2e, zoo):
    """Every nn.Linear of the model becomes a oneDNN qlinear call: fp32 output
    in the int8 peer; in the int8-mixed-bf16 peer bf16 output except where a
    residual add + LayerNorm (fp32 under autocast) reads it; uint8 where the
    next linear reads it requantized (linear + gelu feeding the FFN output)."""
    report, codes = pt2e
    linears = sum(isinstance(m, torch.nn.Linear) for m in zoo("bert4rec:tiny").module.modules())
    assert f"{linears} int8 per-channel weights" in report.variant("peer: torchao-pt2e-int8")["notes"]
    with_qlinear = [c for c in codes if "onednn.qlinear_pointwise" in c]
    assert len(with_qlinear) == len(PT2E), f"{len(codes)} generated modules, {len(with_qlinear)} with qlinear"
    int8 = _qlinear_out_dtypes(with_qlinear[0])
    assert len(int8) == linears
    assert set(int8) == {"torch.float32", "torch.uint8"}
    if len(PT2E) == 2:  # the int8-mixed-bf16 peer, on CPUs with bf16 GEMM kernels
        mixed = _qlinear_out_dtypes(with_qlinear[1])
        assert len(mixed) == linears
        assert set(mixed) <= {"torch.bfloat16", "torch.float32", "torch.uint8"}
        assert mixed.count("torch.bfloat16") >= linears // 2, mixed


def test_near_miss_nothing_to_quantize_is_reported_failed():
    """A matmul of two inputs has no weight: the peer is failed with the reason."""
    from tests.models import ActivationMatmul

    prog = graphopt.capture(ActivationMatmul().eval(), (torch.randn(2, 5, 8), torch.randn(2, 5, 8)))
    report = graphopt.bench(prog, ["none"], ["eager"], peers=PT2E, batch_sizes=[2], quick=True, memory=False)
    for name in PT2E:
        v = report.variant(f"peer: {name}")
        assert v["status"] == "failed" and "quantized no weight" in v["reason"], v
    assert report.variant("fp32 @ eager")["status"] == "ok"
    assert len(report.not_measured("b2")) == len(PT2E)


@pytest.mark.parametrize(
    ("data", "words"),
    [([], "calibration_data is empty"), ([(torch.zeros(4, 16, dtype=torch.long),)], "torchao-pt2e: ")],
    ids=["empty", "wrong-arity"],
)
def test_near_miss_unusable_calibration_data_is_reported_failed(zoo, data, words):
    """The harness hands the peers graphopt's calibration_data: empty or not
    matching the model's inputs fails them with a one-line reason, the bench runs on."""
    report = graphopt.bench(
        zoo("bert4rec:tiny"), ["none"], ["eager"], peers=["torchao-pt2e-int8"],
        batch_sizes=[12], seq_lens=[16], quick=True, memory=False, calibration_data=data,
    )
    v = report.variant("peer: torchao-pt2e-int8")
    assert v["status"] == "failed" and words in v["reason"] and "\n" not in v["reason"], v
    assert _row(report, "fp32 @ eager")["status"] == "ok"
