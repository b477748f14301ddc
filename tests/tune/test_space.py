"""The search space reads its knobs from the pass and runtime registries."""

from __future__ import annotations

import pytest

from graphopt.bench.pipelines import DEFAULT_PIPELINES, parse_pipeline_spec
from graphopt.options import Option
from graphopt.transform.base import get_pass, get_preset
from graphopt.transform.pipeline import parse_pipeline
from graphopt.tune.budget import parse_budget
from graphopt.tune.data import DataSpecError
from graphopt.tune.fidelity import parse_drop
from graphopt.tune.space import Candidate, build_space, default_candidates, o2_fusions


def test_fusions_are_what_o2_adds_to_o1():
    fusions = o2_fusions()
    assert "fuse-qkv" in fusions and "fuse-attention" in fusions
    assert not set(fusions) & set(get_preset("O1").split(","))
    assert "cse" not in fusions and "dce" not in fusions


def test_a_new_cast_option_shows_up_in_the_bf16_policies(monkeypatch):
    cast = get_pass("cast")
    before = build_space(["eager"], bf16_kernels=True).bf16
    assert before[0] == "cast{dtype=bf16}"
    assert "cast{dtype=bf16 policy=fast}" in before  # every non-default policy is a candidate
    # an option a later change adds to cast appears with each non-default value
    extra = Option("accumulate", str, "fp32", "GEMM accumulation", choices=("fp32", "bf16", "auto"))
    monkeypatch.setattr(cast, "options", (*cast.options, extra))
    after = build_space(["eager"], bf16_kernels=True).bf16
    assert "cast{dtype=bf16 accumulate=bf16}" in after and "cast{dtype=bf16 accumulate=auto}" in after
    for step in after:  # every generated step is valid pipeline text for the pass as registered
        parse_pipeline(step)


def test_int8_variants_cover_every_calibration_method():
    methods = next(o.choices for o in get_pass("quantize-int8").options if o.name == "calibration")
    space = build_space(["eager"])
    assert space.int8[0] == "quantize-int8"
    for m in methods[1:]:
        assert f"quantize-int8{{calibration={m}}}" in space.int8
    assert not any("max_drop" in s or "skip=" in s for s in space.int8)  # guards and layer lists are not knobs


def test_runtime_options_come_from_the_backend_registry():
    space = build_space(["eager", "onnxruntime", "inductor", "torchscript"])
    ort = space.runtime_options["onnxruntime"]
    assert ("lower", (("fusions", "off"),)) in ort and ("lower", (("slim", "true"),)) in ort
    assert ("load", (("graph_optimization_level", "basic"),)) in ort or any(
        w == "load" and m[0][0] == "graph_optimization_level" for w, m in ort)
    inductor = space.runtime_options["inductor"]  # max_autotune's default is decided per Program: both values
    assert ("lower", (("max_autotune", "true"),)) in inductor and ("lower", (("max_autotune", "false"),)) in inductor
    names = {m[0][0] for moves in space.runtime_options.values() for _, m in moves}
    assert not names & {"device", "providers", "spin", "save_optimized", "intra_op_threads"}
    assert space.runtime_options["eager"] == []


def test_defaults_are_the_bench_pipelines_on_every_runtime():
    space = build_space(["eager", "onnxruntime"], bf16_kernels=True)
    defaults = default_candidates(space)
    texts = {parse_pipeline_spec(p).text for p in DEFAULT_PIPELINES}
    assert {c.pipeline for c in defaults} == texts
    assert len(defaults) == 2 * len(texts)
    assert [c.runtime for c in defaults[:2]] == ["eager", "onnxruntime"]  # every runtime's O2 first


@pytest.mark.parametrize("bf16_kernels", [False, True])
def test_bf16_settings_are_left_out_where_the_cpu_has_no_bf16_kernels(bf16_kernels, monkeypatch):
    """As the bench's defaults: no bf16 cast or int8-mixed-bf16 candidate where oneDNN would run
    bf16 as reference code, said in a note; the fp32 and int8 knobs stay (a GPU keeps them all)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    space = build_space(["eager", "inductor"], bf16_kernels=bf16_kernels)
    both = build_space(["eager", "inductor"], bf16_kernels=True)
    mixed = [s for s in both.int8 if "mixed=bf16" in s]
    assert both.bf16 and mixed and not both.notes
    pipelines = {c.pipeline for c in default_candidates(space)}
    if bf16_kernels:
        assert space.bf16 == both.bf16 and space.int8 == both.int8 and not space.notes
        assert any("cast{dtype=bf16}" in p for p in pipelines)
    else:
        assert space.bf16 == [] and space.int8 == [s for s in both.int8 if s not in mixed]
        assert space.int8_dynamic == both.int8_dynamic and space.fusions == both.fusions
        assert space.notes == [f"{len(both.bf16)} bf16 cast(s) and {len(mixed)} int8-mixed-bf16 setting(s) not "
                               "tried: this CPU has no bf16 GEMM kernels (AVX2 only), so oneDNN runs bf16 as "
                               "reference code"]
        assert not any("bf16" in p for p in pipelines) and any("quantize-int8" in p for p in pipelines)


def test_candidate_text_keys_and_json():
    fusions = tuple(f for f in o2_fusions() if f != "fuse-qkv")
    c = Candidate(fusions=fusions, precision="quantize-int8{calibration=entropy}", keep_float=2,
                  embeddings="quantize-embeddings{bits=8}", runtime="onnxruntime", lower=(("fusions", "off"),))
    text = c.resolved_pipeline(["a.b", "c.d", "e.f"])
    assert "fuse-qkv" not in text and text.startswith("O1,") and "skip=a.b,c.d}" in text
    parse_pipeline(text)
    assert c.key == ("O1," + ",".join(fusions) + ",cse,dce,quantize-int8{calibration=entropy} (keep-float=2),"
                     "quantize-embeddings{bits=8} @ onnxruntime [fusions=off]")
    assert Candidate.from_json(c.to_json()) == c
    assert Candidate(fusions=None).pipeline == "" and Candidate(fusions=()).pipeline == "O1"
    assert Candidate(fusions=tuple(o2_fusions())).pipeline == "O2"


@pytest.mark.parametrize("text, seconds", [("600", 600), ("90s", 90), ("10m", 600), ("1.5h", 5400), (30, 30)])
def test_budget_parsing(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "-5", "0", "10x", ""])
def test_bad_budgets_are_one_line_errors(text):
    with pytest.raises(DataSpecError, match="--budget"):
        parse_budget(text)


def test_max_drop_parsing():
    assert parse_drop("0.5%") == pytest.approx(0.005) and parse_drop("0.01") == 0.01
    for bad in ("150%", "-1%", "abc"):
        with pytest.raises(DataSpecError, match="--max-drop"):
            parse_drop(bad)
