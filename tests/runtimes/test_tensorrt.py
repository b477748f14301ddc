"""tensorrt: what the lowering decides without TensorRT (optimization profile, network and
builder flags per TensorRT version, option and int8 refusals, the precision path through
the ONNX graph) runs anywhere; the real engine build + run needs the tensorrt package and a
CUDA GPU and skips with the reason elsewhere."""

from __future__ import annotations

import re
import threading

import pytest
import torch
from graphopt.runtimes.tensorrt import (
    BACKEND,
    compatibility_refusal,
    default_profile,
    engine_flags,
    parse_profile,
    profile_shapes,
)

import graphopt
from graphopt.errors import LoweringError
from graphopt.options import resolve_options
from graphopt.process import quiet_backends
from graphopt.runtime import available_runtimes, dim_ranges, load, lower

_TRT = available_runtimes()["tensorrt"]


def needs_trt(fn):
    """A real-TensorRT test: the ``tensorrt`` marker, skipped with the reason where it cannot run."""
    return pytest.mark.tensorrt(pytest.mark.skipif(not _TRT.available, reason=f"tensorrt unavailable: {_TRT.reason}")(fn))



#: fp32 engines run matmuls in TF32 (TensorRT's default): ~1e-3 relative
TF32 = {"atol": 1e-3, "rtol": 1e-3}


def _options(**given):
    """The lowering options as lower() resolves them (defaults, coercion, each option's check)."""
    return resolve_options(BACKEND.lower_options, given, "tensorrt | lower", LoweringError)


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
    # a proven min is the profile's min (was 1 whatever the range), and opt stays inside it
    assert default_profile(prog, {"batch": {"min": 8, "max": None}, "seq": {"min": 1, "max": 512}}) == {
        "batch": (8, 8, 64), "seq": (1, 16, 512)}


def test_profile_shapes_per_input(program):
    prog = program("bert4rec:tiny")
    shapes = profile_shapes(prog, dim_ranges(prog), "batch=1:4:16,seq=4:16:64")
    assert shapes == {name: [[1, 4], [4, 16], [16, 64]] for name in ("input_ids", "attention_mask")}
    dlrm = program("dlrm:tiny")  # dense (4, 13), sparse (4, 4, 3): only batch moves
    assert profile_shapes(dlrm, dim_ranges(dlrm)) == {
        "dense": [[1, 13], [4, 13], [64, 13]], "sparse": [[1, 4, 3], [4, 4, 3], [64, 4, 3]]}
    assert profile_shapes(dlrm, dim_ranges(dlrm), "batch=1:256:1024")["dense"][2] == [1024, 13]  # batch unbounded


def test_profile_refuses_unknown_labels_and_unproven_bounds(program):
    """A typo'd label was ignored and a max past the proven bound accepted: an engine for shapes
    the Program never takes. Both are refused by check_program, which lower() runs before export."""
    prog = program("bert4rec:tiny")  # seq proven <= 512 (positions)
    with pytest.raises(LoweringError, match=r"^tensorrt \| profile label 'seqlen' is not a dynamic dim of "
                                            r"bert4rec:tiny; use its labels: batch, seq$"):
        BACKEND.check_program(prog, _options(profile="batch=1:4:16,seqlen=4:16:64"))
    with pytest.raises(LoweringError, match=r"^tensorrt \| profile seq max 1024 is above 512, the largest seq "
                                            r"bert4rec:tiny accepts; use a max <= 512$"):
        BACKEND.check_program(prog, _options(profile="seq=1:16:1024"))
    BACKEND.check_program(prog, _options(profile="seq=1:16:512"))  # near miss: at the bound
    with pytest.raises(LoweringError, match=r"profile batch min 2 is below 4, .*; use a min >= 4$"):
        profile_shapes(prog, {"batch": {"min": 4, "max": None}, "seq": {"min": 1, "max": 512}}, "batch=2:4:8")


@pytest.mark.parametrize("version,network", [("10.0.1.6", ["STRONGLY_TYPED"]), ("10.13.3.9", ["STRONGLY_TYPED"]),
                                             ("11.0.0.114", []), ("11.4.0.12", [])])
def test_engine_flags_are_strongly_typed_and_never_precision(version, network):
    """TensorRT 11 removed BuilderFlag.FP16/BF16/INT8 (setting them raised AttributeError at build):
    10.x opts in to strong typing, 11.x always is; TF32 is TensorRT's default, cleared on request."""
    assert engine_flags(version) == {"network": network, "clear": []}
    assert engine_flags(version, tf32=False) == {"network": network, "clear": ["TF32"]}


def test_engine_flags_refuse_tensorrt_before_10():
    with pytest.raises(LoweringError, match=r"^tensorrt \| TensorRT '8.6.1' is not supported; pip install 'tensorrt>=10'$"):
        engine_flags("8.6.1")


def test_fp16_option_is_refused_with_the_cast_to_use(program):
    with pytest.raises(LoweringError, match=r"^tensorrt \| lower option 'fp16': removed .*-p 'cast\{dtype=fp16\}'$"):
        _options(fp16=True)
    assert _options(fp16=False)["tf32"] is True  # near miss; TF32 on by default
    # the path it names: an fp16 Program exports fp16 weights TensorRT's checker accepts
    from graphopt.runtimes.onnx_export import export_onnx
    from graphopt.runtimes.tensorrt_check import check_onnx

    half, _ = graphopt.optimize(program("bert4rec:tiny"), "cast{dtype=fp16}", verify_each=False)
    with quiet_backends():
        model = export_onnx(half, for_tensorrt=True)
    assert compatibility_refusal(half.name, check_onnx(model)) is None
    assert 10 in {t.data_type for t in model.graph.initializer}  # FLOAT16 weights: strong typing keeps them


def _optimized(program, pipeline):
    prog = program("bert4rec:tiny")
    calib = [prog.sample_inputs(seed=100 + i) for i in range(2)]
    q, _ = graphopt.optimize(prog, pipeline, calibration_data=calib, verify_each=False)
    return q


@pytest.mark.parametrize("pipeline,refusal", [
    ("quantize-int8{calibration=minmax max_drop=0}",
     r"first: error: qdq: .*; TensorRT takes symmetric int8 Q/DQ only; quantize with "
     r"-p 'quantize-int8\{activations=int8\}' \(symmetric int8, zero point 0\)$"),
    ("quantize-int8-dynamic",
     r"first: error: unsupported-op: .*DynamicQuantizeLinear.*; quantize-int8-dynamic can never run on TensorRT "
     r"\(no DynamicQuantizeLinear\); quantize with -p 'quantize-int8\{activations=int8\}'"),
    ("quantize-int8{activations=int8 calibration=minmax max_drop=0}", None),  # near miss: what TensorRT takes
])
def test_int8_refusal_names_the_fix(program, pipeline, refusal):
    """The checker's verdict on the real export of each int8 form, as lower_into words it."""
    from graphopt.runtimes.onnx_export import export_onnx
    from graphopt.runtimes.tensorrt_check import check_onnx

    q = _optimized(program, pipeline)
    with quiet_backends():
        got = compatibility_refusal(q.name, check_onnx(export_onnx(q, for_tensorrt=True)))
    if refusal is None:
        assert got is None
    else:
        assert got is not None and "\n" not in got
        assert got.startswith(f"tensorrt | {q.name} is not TensorRT-compatible")
        assert re.search(refusal, got), got


@needs_trt
def test_engine_builds_and_matches_eager(program, tmp_path):
    prog = program("bert4rec:tiny")
    art = lower(prog, "tensorrt", tmp_path / "trt", profile="batch=1:4:16,seq=4:16:64")
    assert art.manifest["backend"]["profile"]["input_ids"] == [[1, 4], [4, 16], [16, 64]]
    assert art.manifest["backend"]["tf32"] is True
    with load(art.path) as runner:
        for batch, seq in [(1, 8), (3, 12)]:
            feeds = prog.sample_inputs(batch=batch, seq=seq)
            torch.testing.assert_close(runner(*feeds)[0].cpu(), prog(*feeds)[0], **TF32)


@needs_trt
@pytest.mark.parametrize("pipeline,tol", [("cast{dtype=fp16}", 2e-2),
                                          ("quantize-int8{activations=int8 calibration=minmax max_drop=0}", 2e-2)])
def test_precision_comes_from_the_program(program, tmp_path, pipeline, tol):
    """No precision flag is set: an fp16 Program builds fp16 kernels, a symmetric QDQ Program int8 ones,
    each matching the Program it was lowered from."""
    q = _optimized(program, pipeline)
    with load(lower(q, "tensorrt", tmp_path / "trt").path) as runner:
        for batch, seq in [(1, 8), (3, 12)]:
            feeds = q.sample_inputs(batch=batch, seq=seq)
            want = q(*feeds)[0]
            got = runner(*feeds)[0].cpu()
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@needs_trt
def test_threads_sharing_a_runner_each_get_their_own_answer(program, tmp_path):
    """One execution context per runner: without the runner's lock, a thread's input shape or
    addresses could be replaced by another's before its enqueue. Each thread runs its own shape."""
    prog = program("bert4rec:tiny")
    runner = load(lower(prog, "tensorrt", tmp_path / "trt").path)
    cases = [prog.sample_inputs(batch=1 + i % 4, seq=4 + 3 * i, seed=i) for i in range(8)]
    start, got, errors = threading.Barrier(len(cases)), {}, []

    def serve(i):
        start.wait()
        try:
            for _ in range(20):
                got[i] = runner(*cases[i])[0].cpu()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    try:
        assert errors == []
        for i, feeds in enumerate(cases):
            torch.testing.assert_close(got[i], prog(*feeds)[0], **TF32)
    finally:
        runner.close()
