"""inductor: AOTInductor package of an int8 QDQ Program (one more compile: slow)."""

from __future__ import annotations

import pytest

import graphopt
from graphopt.runtime import available_runtimes, lower

pytestmark = pytest.mark.slow


def test_int8_program_compiles_and_matches_eager(program, tmp_path):
    status = available_runtimes()["inductor"]
    if not status.available:
        pytest.skip(status.reason)
    if "quantize-int8" not in graphopt.available_passes():
        pytest.skip("pass quantize-int8 is not registered")
    base = program("bert4rec:tiny")
    calib = [base.sample_inputs(seed=100 + i) for i in range(4)]
    q, _ = graphopt.optimize(base, "quantize-int8", calibration_data=calib, verify_each=False)
    artifact = lower(q, "inductor", tmp_path / "aoti", device="cpu")
    assert artifact.manifest["backend"]["inductor_configs"]["freezing"] is True
    with graphopt.load(artifact.path) as runner:
        for batch, seq in [(1, 8), (3, 12)]:  # one package, two shapes: no recompile
            feeds = q.sample_inputs(batch=batch, seq=seq, seed=3)
            (got,), (want,) = runner(*feeds), q(*feeds)
            assert got.shape == want.shape
            # int8 tolerance: oneDNN int8 GEMMs vs fake-quant fp32 math
            assert (got - want).abs().max().item() <= 2e-2 + 2e-2 * want.abs().max().item()
