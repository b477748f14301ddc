"""graphopt.runtime core: manifest schema, registry, option checks, Runner
protocol, load-time artifact checks, and the CLI verbs (eager/torchscript only:
cheap to lower)."""

from __future__ import annotations

import json

import pytest
import torch

from graphopt.cli import main
from graphopt.errors import ArtifactError, BackendUnavailableError, LoweringError, RunnerError
from graphopt.runtime import (
    MANIFEST_FORMAT,
    available_runtimes,
    is_quantized,
    load,
    lower,
    program_dtypes,
    sha256_file,
)


@pytest.fixture(scope="module")
def eager_artifact(tmp_path_factory):
    from graphopt.rec.zoo import load_model

    prog = load_model("bert4rec:tiny").capture()
    return prog, lower(prog, "eager", tmp_path_factory.mktemp("rt") / "eager", device="cpu")


def test_manifest_schema(eager_artifact):
    prog, art = eager_artifact
    m = json.loads((art.path / "manifest.json").read_text())
    assert m["format"] == MANIFEST_FORMAT
    assert m["runtime"] == "eager" and m["model"] == prog.name and m["source"] == "bert4rec:tiny"
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask"]
    assert m["inputs"][0]["dtype"] == "int64" and m["inputs"][0]["dynamic"] == {"0": "batch", "1": "seq"}
    assert m["outputs"] == prog.output_names
    assert m["dims"]["seq"] == {"min": 1, "max": 512}
    assert {"graphopt", "torch", "backend"} <= set(m["versions"])
    assert m["backend"]["entry"] == "program.pt2"
    assert m["files"]["program.pt2"]["sha256"] == sha256_file(art.path / "program.pt2")


def test_existing_directory_needs_force(eager_artifact, tmp_path):
    prog, _ = eager_artifact
    lower(prog, "eager", tmp_path / "a", device="cpu")
    with pytest.raises(ArtifactError, match="already exists"):
        lower(prog, "eager", tmp_path / "a", device="cpu")
    assert lower(prog, "eager", tmp_path / "a", force=True, device="cpu").runtime == "eager"


def test_unknown_runtime_and_options(eager_artifact, tmp_path):
    prog, art = eager_artifact
    with pytest.raises(LoweringError, match=r"unknown runtime 'onnxruntim' \(did you mean 'onnxruntime'\?\)"):
        lower(prog, "onnxruntim", tmp_path / "x")
    with pytest.raises(LoweringError, match=r"^torchscript \| lower: unknown option 'optimise'"):
        lower(prog, "torchscript", tmp_path / "x", optimise=True)
    with pytest.raises(LoweringError, match="option 'optimize': expected bool"):
        lower(prog, "torchscript", tmp_path / "x", optimize="maybe")
    with pytest.raises(RunnerError, match=r"^eager \| load: unknown option 'threads'"):
        load(art.path, threads=2)
    assert not (tmp_path / "x").exists()


def test_runner_protocol(eager_artifact):
    prog, art = eager_artifact
    runner = load(art.path)
    ids, mask = prog.sample_inputs(batch=2, seq=5)
    assert not runner.is_active
    first = runner(ids, mask)  # ready to call: the first call activates
    assert runner.is_active
    torch.testing.assert_close(first[0], prog(ids, mask)[0], atol=1e-5, rtol=1e-5)
    runner.close()
    assert not runner.is_active
    runner.close()  # safe to repeat
    with pytest.raises(RunnerError, match=r"^eager \| runner is not active; nothing to deactivate"):
        runner.deactivate()
    with runner:
        with pytest.raises(RunnerError, match="already active"):
            runner.activate()
        with pytest.raises(RunnerError, match=r"^eager \| missing input 'attention_mask'"):
            runner.infer({"input_ids": ids})
        with pytest.raises(RunnerError, match="given both by position and by name"):
            runner(ids, input_ids=ids)
        (out,) = runner(ids, attention_mask=mask)
        torch.testing.assert_close(out, prog(ids, mask)[0], rtol=0, atol=0)
    assert not runner.is_active


def test_load_refuses_bad_artifacts(eager_artifact, tmp_path):
    _, art = eager_artifact
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        load(tmp_path / "empty")
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(art.path, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format"] = "graphopt.artifact/0"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest format 'graphopt.artifact/0', this graphopt reads"):
        load(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(bad)
    manifest["format"] = MANIFEST_FORMAT
    manifest["runtime"] = "tvm"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="runtime 'tvm', which this graphopt does not know"):
        load(bad)


def test_available_runtimes_reports_reasons(eager_artifact, tmp_path):
    prog, _ = eager_artifact
    statuses = available_runtimes()
    # built-ins first, in this order; other modules may register more (register_runtime)
    assert list(statuses)[:5] == ["eager", "torchscript", "onnxruntime", "inductor", "tensorrt"]
    assert statuses["eager"].available and statuses["eager"].reason == ""
    trt = statuses["tensorrt"]
    try:
        import tensorrt  # noqa: F401

        has_trt = torch.cuda.is_available()
    except ImportError:
        has_trt = False
    assert trt.available == has_trt
    if not has_trt:
        assert "tensorrt" in trt.reason or "CUDA" in trt.reason
        with pytest.raises(BackendUnavailableError, match=r"^tensorrt \| not available here: "):
            lower(prog, "tensorrt", tmp_path / "trt")
        assert not (tmp_path / "trt").exists()


def test_program_dtypes_and_quantized_detection(eager_artifact):
    prog, _ = eager_artifact
    assert torch.float32 in program_dtypes(prog) and torch.bfloat16 not in program_dtypes(prog)
    assert not is_quantized(prog)  # near miss: a float Program is not QDQ


def test_cli_runtimes_run_and_optimize(tmp_path, capsys):
    assert main(["runtimes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in listed} >= {"eager", "onnxruntime", "tensorrt"}
    out = tmp_path / "out"
    assert main(["optimize", "bert4rec:tiny", "-p", "remove-dropout", "--runtime", "torchscript",
                 "-o", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["artifacts"] == {"torchscript": f"{out}/torchscript"}
    assert (out / "program.pt2").is_file() and (out / "torchscript" / "manifest.json").is_file()
    assert main(["run", str(out), "--random-inputs", "--batch", "3", "--seq", "7", "--repeat", "1"]) == 0
    ran = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ran["runtime"] == "torchscript" and ran["inputs"]["input_ids"] == [3, 7]
    assert main(["run", str(out), "--runtime", "eager", "--random-inputs", "--repeat", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runtime"] == "eager"
    assert main(["run", str(out), "--runtime", "onnxruntime", "--random-inputs"]) == 2
    assert "no onnxruntime/ artifact" in capsys.readouterr().err
    assert main(["optimize", "bert4rec:tiny", "-p", "dce", "--runtime", "tvm", "-o", str(tmp_path / "o2")]) == 2
