"""inductor: lowering options and the unfused linear+act hand-off (int8 AOTI: tests/passes/test_quantize_int8_inductor.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.runtime import available_runtimes, lower

pytestmark = pytest.mark.slow


def test_unfuse_linear_act_hands_inductor_addmm_and_gelu(program):
    """fuse-linear-act's _addmm_activation becomes addmm + gelu for Inductor (which fuses
    that into a prepacked oneDNN linear): exact, weights shared, near miss untouched."""
    from graphopt.runtimes.inductor import unfuse_linear_act

    aten = torch.ops.aten
    fused, _ = graphopt.optimize(program("bert4rec:tiny"), "O2")
    n_fused = sum(n.target is aten._addmm_activation.default for n in fused.gm.graph.nodes)
    assert n_fused > 0
    plain = unfuse_linear_act(fused)
    targets = [n.target for n in plain.gm.graph.nodes]
    assert aten._addmm_activation.default not in targets
    assert targets.count(aten.gelu.default) == n_fused and targets.count(aten.addmm.default) >= n_fused
    plain.gm.graph.lint()
    shared = dict(fused.gm.named_parameters())
    assert all(p is shared[name] for name, p in plain.gm.named_parameters())
    x = fused.sample_inputs(batch=3, seq=10, seed=2)
    torch.testing.assert_close(plain(*x), fused(*x), atol=1e-5, rtol=1e-5)
    untouched = program("dlrm:tiny")  # no fusion ran: nothing to undo
    assert unfuse_linear_act(untouched) is untouched


def test_bf16_mixed_program_lowers_with_the_settings(program, tmp_path):
    """The default bf16 pipeline through AOTInductor with lowering options: the manifest
    records the Inductor config (threads baked into the kernels), outputs within bf16's
    tolerance of the bf16 Program at two shapes of one package."""
    status = available_runtimes()["inductor"]
    if not status.available:
        pytest.skip(status.reason)
    from graphopt.passes.cast import TOLERANCE

    ref = program("bert4rec:tiny")
    bf16, _ = graphopt.optimize(ref, "O2,cast{dtype=bf16}", verify_each=False)
    artifact = lower(bf16, "inductor", tmp_path / "aoti", device="cpu", threads=1, concat_linear=True)
    configs = artifact.manifest["backend"]["inductor_configs"]
    assert configs["cpp.threads"] == 1 and configs["cpp.enable_concat_linear"] is True and configs["freezing"] is True
    with graphopt.load(artifact.path) as runner:
        for batch, seq in [(1, 8), (3, 12)]:
            feeds = ref.sample_inputs(batch=batch, seq=seq, seed=3)
            (got,), (want,) = runner(*feeds), ref(*feeds)
            torch.testing.assert_close(got, want, atol=TOLERANCE["bf16"], rtol=TOLERANCE["bf16"])


def _mlp() -> graphopt.Program:
    """Two float32 linears with a GELU between, captured with a dynamic batch (inputs: (batch, 64))."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    return graphopt.capture(mlp, torch.randn(4, 64), name="mlp")


def test_fresh_interpreter_compile_failure_is_one_line(tmp_path):
    """A compile that runs in a fresh interpreter (weight_prepack off) and fails there is
    reported with that interpreter's last error line, and leaves no package behind."""
    from graphopt.runtimes.inductor_compile import compile_package

    ep = torch.export.export(torch.nn.Linear(8, 4).eval(), (torch.randn(2, 8),))
    configs = {"freezing": True, "cpp.weight_prepack": False, "cpp.no_such_setting": 1}
    with pytest.raises(RuntimeError, match=r"^compiling in a fresh interpreter failed: .*no_such_setting") as info:
        compile_package(ep, tmp_path / "model.pt2", configs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "model.pt2").exists()


def test_a_started_fresh_interpreter_compile_can_be_cancelled(tmp_path):
    """The unautotuned split starts its plain package's compile before compiling the packed one here;
    when this process's compile fails, the started one is killed: no process, no package, no
    temporary folder left."""
    from graphopt.runtimes.inductor_compile import FreshCompile

    ep = torch.export.export(torch.nn.Linear(8, 4).eval(), (torch.randn(2, 8),))
    started = FreshCompile(ep, tmp_path / "model.pt2", {"freezing": True, "cpp.weight_prepack": False})
    folder = Path(started._tmp.name)
    assert started._proc.poll() is None and (folder / "program.pt2").is_file()  # running: it takes seconds
    started.cancel()
    assert started._proc.returncode is not None and not folder.exists()
    assert not (tmp_path / "model.pt2").exists()


def test_lowering_options_are_checked(program, tmp_path):
    from graphopt.errors import LoweringError

    with pytest.raises(LoweringError, match="unknown GEMM backend"):
        lower(program("dlrm:tiny"), "inductor", tmp_path / "x", gemm_backends="CPP,CUTLASS")


def test_split_rows_runs_a_plain_weights_package_from_that_many_rows(tmp_path):
    """split_rows=N: the artifact holds a second package compiled with plain weights (MKL's GEMM),
    checksummed like the first; a call of N rows or more runs it, fewer rows the packed one (oneDNN's
    linear): the runner's output is bit for bit the chosen package's, and the two packages' outputs
    differ in their last bits; both match the Program (1e-5). The plain package is weight_prepack=False,
    compiled in a fresh interpreter beside the packed compile in this process (Inductor registers its
    packing patterns once per process): it holds no oneDNN linear. Neither was autotuned: the GEMM
    census counts both linears as oneDNN/ATen calls and no CPP GEMM template."""
    if not available_runtimes()["inductor"].available:
        pytest.skip(available_runtimes()["inductor"].reason)
    from graphopt.runtimes.inductor_code import gemm_census, wrapper_calls, wrapper_source

    from graphopt.errors import ArtifactError, LoweringError
    from graphopt.runtime.artifact import read_artifact

    ref = _mlp()
    artifact = lower(ref, "inductor", tmp_path / "split", device="cpu", max_autotune=False, split_rows=8)
    backend = artifact.manifest["backend"]
    assert backend["entry"] == "model.pt2" and "cpp.weight_prepack" not in backend["inductor_configs"]
    assert backend["split"]["entry"] == "model_rows.pt2" and backend["split"]["from_rows"] == 8
    assert backend["split"]["inductor_configs"]["cpp.weight_prepack"] is False
    assert set(artifact.manifest["files"]) == {"model.pt2", "model_rows.pt2"}
    packages = {name: artifact.path / name for name in ("model.pt2", "model_rows.pt2")}
    kernels = {name: [c.kernel for c in wrapper_calls(wrapper_source(path))] for name, path in packages.items()}
    assert "aoti_torch_cpu__linear_pointwise" in kernels["model.pt2"], kernels
    assert "aoti_torch_cpu_addmm_out" in kernels["model_rows.pt2"], kernels
    assert not [k for k in kernels["model_rows.pt2"] if k.startswith("aoti_torch_cpu__linear_pointwise")], kernels
    assert {name: dict(gemm_census(path)) for name, path in packages.items()} == {
        "model.pt2": {"onednn": 2}, "model_rows.pt2": {"onednn": 2}}
    alone = {name: torch._inductor.aoti_load_package(str(path)) for name, path in packages.items()}
    with graphopt.load(artifact.path) as runner, torch.inference_mode():
        for batch, chosen in ((1, "model.pt2"), (7, "model.pt2"), (8, "model_rows.pt2"), (9, "model_rows.pt2")):
            x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch))
            (got,), outs = runner(x), {name: model(x)[0] for name, model in alone.items()}
            torch.testing.assert_close(got, ref(x)[0], atol=1e-5, rtol=1e-5)
            assert not torch.equal(outs["model.pt2"], outs["model_rows.pt2"])  # so the test can tell them apart
            assert torch.equal(got, outs[chosen]), batch
    # the split package is one of the files the runner opens: a missing one is refused before loading
    (artifact.path / "model_rows.pt2").unlink()
    with pytest.raises(ArtifactError, match="model_rows.pt2"):
        read_artifact(artifact.path)
    with pytest.raises(LoweringError, match="split_rows.*must be >= 0"):
        lower(ref, "inductor", tmp_path / "bad", split_rows=-1)


def test_split_rows_left_unset_is_decided_per_program_and_cpu(monkeypatch):
    """Unset, split_rows is 512 (SPLIT_ROWS) for an autotuned float32 CPU Program with packed weights where MKL is
    not Intel's tuned one (runtimes/inductor.py: measured on an AMD EPYC), else 0 (one package):
    on an Intel CPU, on CUDA, for bf16 and int8 Programs, unautotuned or unpacked ones; given, it wins."""
    if not available_runtimes()["inductor"].available:
        pytest.skip(available_runtimes()["inductor"].reason)
    import graphopt.runtimes.inductor as inductor_runtime

    from graphopt.options import resolve_options
    from graphopt.runtime.backend import is_quantized

    fp32 = _mlp()
    bf16, _ = graphopt.optimize(fp32, "cast{dtype=bf16}", verify_each=False)
    calib = [(torch.randn(32, 64, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    int8, _ = graphopt.optimize(fp32, "quantize-int8{metric=cosine max_drop=0.5}", calibration_data=calib,
                                verify_each=False)
    assert is_quantized(int8)
    backend = inductor_runtime.BACKEND

    def decided(prog, **given):
        opts = resolve_options(backend.lower_options, {"device": "cpu", "max_autotune": True, **given},
                               "inductor | lower", ValueError)
        return backend.complete_options(prog, opts)["split_rows"]

    for fast, want in ((False, inductor_runtime.SPLIT_ROWS), (True, 0)):
        monkeypatch.setattr(inductor_runtime, "has_fast_mkl", lambda fast=fast: fast)
        assert decided(fp32) == want
        assert decided(bf16) == decided(int8) == 0
        assert decided(fp32, max_autotune=False) == decided(fp32, weight_prepack=False) == 0
        assert decided(fp32, split_rows=64) == 64 and decided(bf16, split_rows=64) == 64
    assert inductor_runtime.split_rows_by_default(fp32, "cuda", {"max_autotune": True, "weight_prepack": True}) == 0


def test_asymmetric_int8_weights_are_refused_before_compiling(tmp_path):
    """Was: quantize-int8{symmetric_weights=false} lowered; Inductor's x86 int8 kernels drop per-channel
    weight zero points: 0.137 off the Program on this Linear(16, 8), silently. ONNX Runtime keeps them
    (the near miss: exact to the Program), and symmetric weights (the default) pass the check."""
    import re

    from graphopt.runtimes.inductor_program import check_weight_zero_points

    from graphopt.errors import LoweringError

    torch.manual_seed(0)
    prog = graphopt.capture(torch.nn.Linear(16, 8).eval(), (torch.randn(4, 16),))
    batches = [(torch.randn(4, 16),) for _ in range(4)]
    pipe = "quantize-int8{calibration=minmax max_drop=0 symmetric_weights=%s}"
    asym, _ = graphopt.optimize(prog, pipe % "false", calibration_data=batches)
    sym, _ = graphopt.optimize(prog, pipe % "true", calibration_data=batches)
    with pytest.raises(LoweringError) as info:
        lower(asym, "inductor", tmp_path / "asym")
    assert re.fullmatch(r"inductor \| \S+ has int8 weights with per-channel zero points .* quantize with "
                        r"symmetric_weights=true \(the default\), or lower it for eager or onnxruntime",
                        str(info.value)), str(info.value)
    assert not (tmp_path / "asym").exists()
    check_weight_zero_points(sym)  # symmetric: nothing to refuse
    x = torch.randn(5, 16)
    with graphopt.load(lower(asym, "onnxruntime", tmp_path / "ort").path) as runner:
        torch.testing.assert_close(runner(x)[0], asym(x)[0], atol=1e-5, rtol=1e-5)
