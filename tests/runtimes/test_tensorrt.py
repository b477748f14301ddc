"""tensorrt: optimization-profile construction (runs anywhere) and the real
engine build + run (needs the tensorrt package and a CUDA GPU)."""

from __future__ import annotations

import pytest
import torch
from graphopt.runtimes.tensorrt import default_profile, parse_profile

from graphopt.errors import LoweringError
from graphopt.runtime import available_runtimes, dim_ranges, load, lower

_TRT = available_runtimes()["tensorrt"]


def test_profile_text_parses_and_validates():
    assert parse_profile("batch=1:8:64, seq=8:64:512") == {"batch": (1, 8, 64), "seq": (8, 64, 512)}
    assert parse_profile("") == {}
    with pytest.raises(LoweringError, match="expected label=min:opt:max"):
        parse_profile("batch=1:8")
    with pytest.raises(LoweringError, match="min <= opt <= max"):
        parse_profile("batch=8:1:64")


def test_default_profile_follows_the_program(program):
    prog = program("bert4rec:tiny")  # example (4, 16); seq proven <= 512
    assert default_profile(prog, dim_ranges(prog)) == {"batch": (1, 4, 64), "seq": (1, 16, 512)}
    dlrm = program("dlrm:tiny")  # only batch is dynamic
    assert default_profile(dlrm, dim_ranges(dlrm)) == {"batch": (1, 4, 64)}


@pytest.mark.tensorrt
@pytest.mark.skipif(not _TRT.available, reason=f"tensorrt unavailable: {_TRT.reason}")
def test_engine_builds_and_matches_eager(program, tmp_path):
    prog = program("bert4rec:tiny")
    art = lower(prog, "tensorrt", tmp_path / "trt", profile="batch=1:4:16,seq=4:16:64")
    assert art.manifest["backend"]["profile"]["input_ids"] == [[1, 4], [4, 16], [16, 64]]
    with load(art.path) as runner:
        for batch, seq in [(1, 8), (3, 12)]:
            feeds = prog.sample_inputs(batch=batch, seq=seq)
            torch.testing.assert_close(runner(*feeds)[0].cpu(), prog(*feeds)[0], atol=1e-3, rtol=1e-3)
