"""The CLI audit's findings (s26): each user mistake gets one line on stderr that says what to do, exit 2,
found before the work it would waste; no traceback, no "(unexpected ... please report it)" line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.cli import main
from graphopt.errors import ModelNotFoundError

ROOT = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The error line; fails on a traceback, an 'unexpected' line or more than one line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("graphopt: error: ") and "unexpected" not in lines[0], err
    return lines[0]


def refused(capsys, *argv, code: int = 2) -> str:
    got, _, err = run(capsys, *argv)
    assert got == code, err
    return one_line(err)


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the refusal must come before it."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    for where in ("graphopt.cli.optimize.load_program_and_inputs", "graphopt.cli.inspect.load_program"):
        monkeypatch.setattr(where, load)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """`graphopt optimize bert4rec:tiny -p dce -o OUT --runtime torchscript` (program.pt2, OUT/torchscript/)."""
    folder = tmp_path_factory.mktemp("audit") / "out"
    assert main(["optimize", "bert4rec:tiny", "-p", "dce", "-o", str(folder), "--runtime", "torchscript"]) == 0
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory, zoo):
    """A real Hugging Face folder (bert-cls:tiny's save_pretrained)."""
    folder = tmp_path_factory.mktemp("hf") / "bert-cls"
    zoo("bert-cls:tiny").module.save_pretrained(folder)
    return folder


def _hf_copy(hf: Path, tmp_path: Path, edit=None) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(hf, folder)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(edit(config))
    return folder


# A. --seq/--batch are checked against the artifact's dims before any input is sampled
def test_run_sizes_refused_before_sampling(out, capsys, monkeypatch):
    def sample(*args, **kwargs):
        raise AssertionError("inputs sampled before the size check")

    monkeypatch.setattr(graphopt.ir.program.InputSpec, "sample", sample)
    line = refused(capsys, "run", out / "torchscript", "--random-inputs", "--seq", 10**6)
    assert "--seq 1000000" in line and "takes seq in [1, 512]" in line
    line = refused(capsys, "run", out / "program.pt2", "--random-inputs", "--seq", 513)
    assert "--seq 513" in line and "[1, 512]" in line
    # batch has no upper bound: inputs larger than half the machine's memory are refused, not allocated
    line = refused(capsys, "run", out / "torchscript", "--random-inputs", "--batch", 10**12)
    assert "--batch 1000000000000" in line and "GiB" in line and "pick smaller sizes" in line


def test_run_sizes_within_range_still_run(out, capsys):
    code, stdout, err = run(capsys, "run", out / "torchscript", "--random-inputs", "--batch", 3, "--seq", 7, "--repeat", 1)
    assert code == 0, err
    assert json.loads(stdout.splitlines()[-1])["inputs"]["input_ids"] == [3, 7]


# B, C. damaged Hugging Face folders: rc 2, one line naming the file and the cause
@pytest.mark.parametrize("edit, expected", [
    (lambda c: "{broken", "config.json is not valid JSON"),
    (lambda c: "[1, 2]", "config.json holds a JSON list, not an object"),
    (lambda c: json.dumps({**c, "architectures": [123]}), '"architectures" must be a list of transformers class names'),
    (lambda c: json.dumps({**c, "architectures": ["NoSuchModel"]}), "names architecture 'NoSuchModel', which transformers"),
    (lambda c: json.dumps({**c, "intermediate_size": 48}), "do not load into the BertForSequenceClassification"),
], ids=["bad-json", "json-list", "architectures-123", "unknown-architecture", "size-mismatch"])
def test_damaged_hugging_face_config_is_a_usage_error(hf, tmp_path, capsys, edit, expected):
    folder = _hf_copy(hf, tmp_path, edit)
    line = refused(capsys, "inspect", folder)
    assert expected in line and str(folder) in line


def test_truncated_hugging_face_weights_are_a_usage_error(hf, tmp_path, capsys):
    folder = _hf_copy(hf, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = refused(capsys, "inspect", folder)
    assert f"the weights in {folder} do not load" in line and "SafetensorError" in line


def test_unknown_architecture_is_not_captured_headless(hf, tmp_path, capsys):
    """Was: captured as AutoModel, the classification head silently dropped (rc 0)."""
    folder = _hf_copy(hf, tmp_path, lambda c: json.dumps({**c, "architectures": ["BertForNothing"]}))
    line = refused(capsys, "optimize", folder, "-p", "dce", "-o", tmp_path / "o")
    assert "'BertForNothing'" in line
    assert not (tmp_path / "o").exists()


def test_check_tensorrt_truncated_onnx(tmp_path, capsys):
    pytest.importorskip("onnx")
    from graphopt.runtimes.onnx_export import export_onnx, save_onnx

    program = graphopt.capture(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    onnx_file = tmp_path / "model.onnx"
    save_onnx(export_onnx(program), onnx_file, program.parameter_bytes())
    onnx_file.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    line = refused(capsys, "check-tensorrt", onnx_file)
    assert f"{onnx_file} is not a readable ONNX model" in line and "DecodeError" in line


def test_check_tensorrt_without_onnx_names_the_extra(tmp_path, capsys, monkeypatch):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    line = refused(capsys, "check-tensorrt", onnx_file)
    assert "pip install 'graphopt[onnx]'" in line


def test_plot_without_matplotlib_refused_before_the_analysis(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = refused(capsys, "inspect", "bert4rec:tiny", "--plot", tmp_path / "mem.png")
    assert "--plot needs matplotlib: pip install 'graphopt[plots]'" in line


# D. an unknown --runtime is a usage error for run as for optimize
def test_run_unknown_runtime_is_a_usage_error(out, capsys):
    line = refused(capsys, "run", out, "--runtime", "onnx", "--random-inputs")
    assert "--runtime: unknown runtime 'onnx' (did you mean 'onnxruntime'?)" in line


# E. optimize checks --runtime and --reproducer before loading the model
def test_optimize_duplicate_runtime_lowers_once(tmp_path, capsys):
    code, stdout, err = run(capsys, "optimize", "bert4rec:tiny", "-p", "dce", "-o", tmp_path / "o",
                            "--runtime", "torchscript", "--runtime", "torchscript")
    assert code == 0, err
    assert list(json.loads(stdout)["artifacts"]) == ["torchscript"]
    assert (tmp_path / "o" / "torchscript" / "manifest.json").is_file()


def test_optimize_unavailable_runtime_refused_up_front(tmp_path, capsys, no_model_load):
    status = graphopt.available_runtimes()["tensorrt"]
    if status.available:
        pytest.skip("tensorrt is available here")
    line = refused(capsys, "optimize", "bert4rec:tiny", "-p", "dce", "-o", tmp_path / "o", "--runtime", "tensorrt")
    assert line == f"graphopt: error: --runtime tensorrt: not available here: {status.reason}"


def test_optimize_refused_reproducer_found_up_front(out, tmp_path, capsys, no_model_load):
    line = refused(capsys, "optimize", "bert4rec:tiny", "-p", "dce", "-o", tmp_path / "o", "--reproducer", out)
    assert line.startswith(f"graphopt: error: --reproducer {out}") and " -o" not in line
    assert (out / "program.pt2").is_file() and (out / "torchscript").is_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    line = refused(capsys, "optimize", "bert4rec:tiny", "-p", "dce", "-o", tmp_path / "o", "--reproducer", mine)
    assert "--reproducer" in line and " -o" not in line and (mine / "notes.txt").read_text() == "mine"


# F. inductor needs a working C++ compiler
def test_inductor_unavailable_without_a_cpp_compiler():
    env = {**os.environ, "CXX": "/nonexistent/g++"}
    done = subprocess.run([sys.executable, "-m", "graphopt", "runtimes", "--json"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    inductor = next(s for s in json.loads(done.stdout) if s["name"] == "inductor")
    assert not inductor["available"] and "/nonexistent/g++ does not run" in inductor["reason"]


# G. messages that say what the path is and what to give instead
def test_run_messages_name_what_the_path_is(out, capsys):
    line = refused(capsys, "run", out / "program.pt2", "--runtime", "torchscript", "--random-inputs")
    assert "is a saved Program, which runs eagerly" in line and "neither" not in line
    line = refused(capsys, "run", out / "nonexist", "--random-inputs")
    assert f"no such file or directory: {out / 'nonexist'}" in line


def test_inspect_messages_name_what_the_file_is(out, tmp_path, capsys, program):
    line = refused(capsys, "inspect", out / "torchscript")
    assert "is a lowered artifact, not a model" in line and "graphopt run" in line
    assert str(out / "program.pt2") in line
    line = refused(capsys, "inspect", out / "torchscript" / "model.ts")
    assert "is a TorchScript module (torch.jit.save), not a saved Program" in line and "warnings above" not in line
    torch.save(program("bert4rec:tiny").gm.state_dict(), tmp_path / "state.pt")
    line = refused(capsys, "inspect", tmp_path / "state.pt")
    assert "is a torch.save file (a state dict or tensors), not a saved Program" in line


def test_debug_and_verbose_accepted_after_the_verb(capsys, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DEBUG", "0")  # main sets it: restored after the test
    with pytest.raises(ModelNotFoundError):  # --debug: the traceback, not the one line
        main(["inspect", "nonexist/model.pt2", "--debug"])
    code, stdout, err = run(capsys, "models", "-v")
    assert code == 0 and "bert4rec:tiny" in stdout, err


def test_output_under_a_file_refused_up_front(tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    line = refused(capsys, "optimize", "bert4rec:tiny", "-p", "dce", "-o", tmp_path / "afile" / "sub")
    assert f"{tmp_path / 'afile'} is a file, not a folder" in line


# H. cosmetics
def test_size_list_message_names_the_flag_once(capsys):
    line = refused(capsys, "inspect", "bert4rec:tiny", "--batch-sizes", "8,0")
    assert line == "graphopt: error: argument --batch-sizes: expected positive integers, got '8,0'"


@pytest.mark.parametrize("verb", ["models", "passes"])
def test_closed_stdout_is_quiet(verb):
    read, write = os.pipe()
    os.close(read)  # the reader (`| head -1`) is gone before graphopt writes
    try:
        done = subprocess.run([sys.executable, "-m", "graphopt", verb], stdout=write, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, timeout=300)
    finally:
        os.close(write)
    assert done.stderr == "" and done.returncode in (0, 141)


def test_memory_sizes_no_machine_could_run_refused(capsys):
    line = refused(capsys, "inspect", "bert4rec:tiny", "--memory", "--batch-sizes", "99999999999999999999")
    assert "below 2^63" in line
    line = refused(capsys, "inspect", "bert4rec:tiny", "--memory", "--batch-sizes", "1,999999999999999999")
    assert "beyond a 64-bit address space" in line and "batch 999999999999999999" in line
