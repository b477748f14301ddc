"""Every CLI verb, including its error paths: exit codes and one-line messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import graphopt
from graphopt import Program
from graphopt.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_passes_lists_every_pass_with_options(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0
    for name in ("dce", "remove-dropout", "remove-noop"):
        assert f"{name}  —" in out
    assert "O1" in out
    code, out, _ = run(capsys, "passes", "--json")
    data = json.loads(out)
    assert data["passes"]["remove-noop"]["requires"] == ["shapes"]
    assert "O1" in data["presets"]


def test_models_lists_the_zoo(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert {"bert4rec:tiny", "bert-cls:base", "dlrm:tiny", "two-tower:tiny", "gpt-rec:tiny", "gpt-rec:base"} <= set(out.split())


def test_inspect_zoo_model(capsys):
    code, out, _ = run(capsys, "inspect", "bert4rec:tiny")
    assert code == 0
    assert "aten.linear.default" in out
    assert "[batch, seq]" in out
    assert "parameters" in out


def test_optimize_writes_program_and_report(tmp_path, capsys, zoo):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "optimize", "bert-cls:tiny", "-p", "remove-dropout,dce", "-o", str(out_dir), "--report")
    assert code == 0, err
    assert "remove-dropout" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["pipeline"] == "remove-dropout,dce"
    assert report["passes"][0]["stats"]["eval-dropout-clone"] == 6
    loaded = Program.load(out_dir / "program.pt2")
    inputs = zoo("bert-cls:tiny").make_inputs(batch=3, seq=20, seed=9)
    ref = zoo("bert-cls:tiny").module(**inputs).logits
    torch.testing.assert_close(loaded(*inputs.values())[0], ref, atol=1e-5, rtol=1e-5)
    # the saved Program is itself a MODEL for the other verbs
    code, out, _ = run(capsys, "inspect", str(out_dir))
    assert code == 0 and "remove-dropout,dce" in out


def test_optimize_calibrates_a_zoo_model_on_its_own_histories(tmp_path, capsys, zoo):
    """int8 from the command line reads the zoo's histories (a length each, left-padded, as the
    bench calibrates, same seeds), not draws from the input specs (every history full length):
    the activation ranges it saves are those graphopt.optimize finds on the zoo's batches."""
    from graphopt.passlib.calibration import DEFAULT_CALIBRATION_BATCH, default_calibration

    out_dir = tmp_path / "out"
    pipeline = "quantize-int8{calibration=minmax max_drop=0}"  # guard off: the ranges alone decide
    code, _, err = run(capsys, "optimize", "bert4rec:tiny", "-p", pipeline, "-o", str(out_dir),
                       "--calibration-batches", "4")
    assert code == 0, err
    saved = json.loads((out_dir / "report.json").read_text())["passes"][-1]["details"]
    zm = zoo("bert4rec:tiny")
    program = zm.capture()
    made = [zm.make_inputs(batch=DEFAULT_CALIBRATION_BATCH, seed=1000 + i) for i in range(4)]
    masks = torch.cat([m["attention_mask"] for m in made])
    assert bool((masks[:, 1:] >= masks[:, :-1]).all()) and not bool(masks.all())  # left padding: 0s, then 1s
    histories = [tuple(m[n] for n in program.input_names) for m in made]
    random_batches = default_calibration(program, 4)
    assert all(bool(b[program.input_names.index("attention_mask")].all()) for b in random_batches)  # no padding

    def ranges(batches):
        _, report = graphopt.optimize(program, pipeline, calibration_data=batches)
        return [(d["node"], d["act_range"]) for d in report.passes[-1].details]

    assert [(d["node"], d["act_range"]) for d in saved] == ranges(histories) != ranges(random_batches)


def test_local_hugging_face_folder_is_a_model(tmp_path, capsys, zoo):
    folder = tmp_path / "my-finetuned-bert"
    zoo("bert-cls:tiny").module.save_pretrained(folder)
    code, out, err = run(capsys, "inspect", str(folder))
    assert code == 0, err
    assert "my-finetuned-bert" in out and "[batch, seq]" in out and "logits" in out
    code, out, err = run(capsys, "optimize", str(folder), "-p", "O1", "-o", str(tmp_path / "o"))
    assert code == 0, err
    loaded = Program.load(tmp_path / "o")
    inputs = zoo("bert-cls:tiny").make_inputs(batch=2, seq=12, seed=4)
    ref = zoo("bert-cls:tiny").module(**inputs).logits
    torch.testing.assert_close(loaded(*inputs.values())[0], ref, atol=1e-5, rtol=1e-5)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "inspect", str(empty))
    assert code == 2 and "holds neither program.pt2" in err and "Hugging Face config.json" in err


def test_optimize_refuses_to_overwrite_without_force(tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert run(capsys, "optimize", "dlrm:tiny", "-p", "dce", "-o", str(out_dir))[0] == 0
    stamp = (out_dir / "program.pt2").stat().st_mtime_ns
    code, _, err = run(capsys, "optimize", "dlrm:tiny", "-p", "dce", "-o", str(out_dir))
    assert code == 2
    assert "already exists; pass --force" in err
    assert (out_dir / "program.pt2").stat().st_mtime_ns == stamp
    assert run(capsys, "optimize", "dlrm:tiny", "-p", "O1", "-o", str(out_dir), "--force")[0] == 0
    assert json.loads((out_dir / "report.json").read_text())["pipeline"].startswith("remove-dropout")


def test_optimize_lowers_prefill_and_step_with_max_history(tmp_path, capsys):
    """--max-history lowers each --runtime with lower_incremental: the artifact's step continues
    the prefilled users and matches a windowed full recompute (independent reference, 1e-4 fp32);
    the flags' misuse and a model that is not causal are one-line usage errors, nothing written."""
    from tests._incremental import ITEMS, band_reference, histories

    out = tmp_path / "inc"
    code, stdout, err = run(capsys, "optimize", "gpt-rec:tiny", "-p", "O2", "-o", str(out), "--runtime", "eager",
                            "--max-history", "6", "--state-dtype", "native", "--max-positions", "512")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["incremental"] == {"max_history": 6, "state_dtype": "native"}
    ids, mask = histories([5, 3, 1])
    new = torch.tensor([[7], [ITEMS], [1]])
    with graphopt.load(out / "eager") as runner:
        assert runner.artifact.manifest["incremental"]["max_history"] == 6
        assert runner.artifact.manifest["incremental"]["padding_id"] == 0  # a zoo model pads with 0
        _, state = runner.prefill(ids, mask)
        scores, state = runner.step(new, state)
    both, both_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    torch.testing.assert_close(scores, band_reference(both, both_mask, 6), atol=1e-4, rtol=1e-4)
    assert state.length.tolist() == [6, 4, 2]
    bad = {
        ("--max-history", "6"): "--max-history lowers prefill/step entries: name the runtime(s) with --runtime",
        ("--state-dtype", "bf16", "--runtime", "eager"): "--state-dtype needs --max-history N",
        ("--padding-id", "3", "--runtime", "eager"): "--padding-id needs --max-history N",
        ("--runtime", "eager", "--max-history", "0"): "--max-history must be >= 2",
        ("--runtime", "eager", "--max-history", "1"): "--max-history must be >= 2",
        ("--runtime", "eager", "--max-history", "6", "--step-option", "threads"): "--step-option 'threads': expected",
    }
    for extra, message in bad.items():
        code, _, err = run(capsys, "optimize", "gpt-rec:tiny", "-p", "O2", "-o", str(tmp_path / "bad"), *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "bad").exists()
    code, _, err = run(capsys, "optimize", "gpt-rec:tiny", "-p", "O2", "-o", str(tmp_path / "own"), "--runtime",
                       "eager", "--max-history", "6", "--padding-id", "3")  # a model's own padding id
    assert code == 0, err
    assert json.loads((tmp_path / "own" / "eager" / "manifest.json").read_text())["incremental"]["padding_id"] == 3
    code, _, err = run(capsys, "optimize", "bert4rec:tiny", "-p", "O2", "-o", str(tmp_path / "bad"),
                       "--runtime", "eager", "--max-history", "6")
    assert code != 0 and "is not causal" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_force_never_replaces_a_folder_graphopt_did_not_write(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("do not lose me")
    code, _, err = run(capsys, "optimize", "dlrm:tiny", "-p", "O1", "-o", str(user), "--force")
    assert code == 2 and "not written by graphopt" in err and len(err.strip().splitlines()) == 1
    assert (user / "notes.txt").read_text() == "do not lose me" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    # a failing optimize under --force leaves the previous output intact
    out = tmp_path / "out"
    assert run(capsys, "optimize", "dlrm:tiny", "-p", "dce", "-o", str(out))[0] == 0
    before = (out / "report.json").read_text()
    code, _, err = run(capsys, "optimize", "dlrm:tiny", "-p", "dce", "-o", str(out), "--force",
                       "--runtime", "onnxruntime", "--runtime-option", "onnxruntime.no_such_option=1")
    assert code != 0 and (out / "report.json").read_text() == before
    for bad in (".", "~", "/"):
        code, _, err = run(capsys, "optimize", "dlrm:tiny", "-p", "dce", "-o", bad, "--force")
        assert code == 2 and "refusing to write output" in err, bad


@pytest.mark.parametrize(
    ("pipeline", "fragment"),
    [
        ("fuse-qkv{", "column 9"),
        ("remove-dropuot", "did you mean 'remove-dropout'"),
        ("dce,", "column 5"),
    ],
)
def test_bad_pipeline_exits_2_with_column(tmp_path, capsys, pipeline, fragment):
    code, out, err = run(capsys, "optimize", "bert-cls:tiny", "-p", pipeline, "-o", str(tmp_path / "o"))
    assert code == 2
    assert fragment in err
    assert err.startswith("graphopt: error: ")
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unknown_model_and_unreadable_file_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "inspect", "bert5rec:tiny")
    assert code == 2 and "did you mean 'bert4rec'" in err
    code, _, err = run(capsys, "inspect", "dlrm:huge")
    assert code == 2 and "no size 'huge'" in err
    bad = tmp_path / "bad.pt2"
    bad.write_text("garbage")
    code, _, err = run(capsys, "inspect", str(bad))
    assert code == 2 and "not a readable torch.export archive" in err
    code, _, err = run(capsys, "inspect", str(tmp_path / "nope.pt2"))
    assert code == 2 and "no such file" in err
    assert len(err.strip().splitlines()) == 1


def test_failing_pass_exits_1(tmp_path, capsys):
    import tests.transform.test_pass_manager  # noqa: F401  (registers test-raises)

    code, _, err = run(capsys, "optimize", "dlrm:tiny", "-p", "dce,test-raises", "-o", str(tmp_path / "o"))
    assert code == 1
    assert "pass 'test-raises' failed (passes before it: dce)" in err
    assert not (tmp_path / "o").exists(), "no half-written output"


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize", "bert-cls:tiny"])
    assert info.value.code == 2


def test_console_entry_point_runs_as_a_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "graphopt", "optimize", "bert-cls:tiny", "-p", "fuse-qkv{", "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "column 9" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, flag", [
    (["bench", "bert4rec:tiny", "--threads", "-1"], "--threads: expected a positive integer, got -1"),
    (["bench", "bert4rec:tiny", "--rounds", "0"], "--rounds: expected a positive integer, got 0"),
    (["finetune", "bert4rec:tiny", "--lr", "-1"], "--lr: expected a positive number, got -1"),
    (["finetune", "bert4rec:tiny", "--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["run", "x", "--random-inputs", "--batch", "-2"], "--batch: expected a positive integer, got -2"),
    (["serve-stages", "x", "--iterations", "-1"], "--iterations: expected a positive integer, got -1"),
    (["optimize", "dlrm:tiny", "-p", "O2", "--calibration-batches", "0"], "expected a positive integer, got 0"),
    (["bench", "dlrm:tiny", "--runtimes", "eager,onnxrutime"], "unknown runtime 'onnxrutime' (did you mean"),
    (["bench", "dlrm:tiny", "--runtimes", ","], "--runtimes: name at least one runtime"),
    (["demo", "--runtimes", "bogus"], "--runtimes: unknown runtime 'bogus'"),
    (["demo", "--batch-sizes", "8,0"], "--batch-sizes: expected positive integers, got '8,0'"),
])
def test_nonsense_arguments_are_usage_errors(capsys, argv, flag):
    """Were: tracebacks (negative threads, batch, learning rate), silent defaults (rounds 0 ran 15,
    batch size 0 trained at 64), reports of -1 iterations, and a misspelt runtime found only after the
    whole bench had run (every variant "skipped")."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and flag in err and len(err.strip().splitlines()) == 1, err


def test_runtime_options_are_checked_before_the_pipeline_runs(tmp_path, capsys):
    """Were: an unknown option or a bad value failed after the pipeline had run (exit 1), and an option
    without --runtime was dropped silently."""
    out = str(tmp_path / "o")
    cases = {("--runtime", "eager", "--runtime-option", "bogus=1"): "--runtime-option (eager): unknown option 'bogus'",
             ("--runtime", "inductor", "--runtime-option", "max_autotune=maybe"):
                 "--runtime-option (inductor) option 'max_autotune': expected bool",
             ("--runtime-option", "opset=17"): "--runtime-option sets a lowering option: name the runtime(s)"}
    for extra, message in cases.items():
        code, _, err = run(capsys, "optimize", "dlrm:tiny", "-p", "dce", "-o", out, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "o").exists()


def test_run_names_its_input_file_and_artifact_mistakes(tmp_path, capsys):
    code, _, _ = run(capsys, "optimize", "dlrm:tiny", "-p", "dce", "-o", str(tmp_path / "o"), "--runtime", "eager")
    assert code == 0
    art = str(tmp_path / "o" / "eager")
    code, _, err = run(capsys, "run", art, "--inputs", str(tmp_path / "none.pt"))
    assert code == 2 and err.strip() == f"graphopt: error: --inputs {tmp_path / 'none.pt'}: no such file"
    (tmp_path / "text.pt").write_text("not tensors")
    code, _, err = run(capsys, "run", art, "--inputs", str(tmp_path / "text.pt"))
    assert code == 2 and "not a file of tensors torch.load can read safely" in err and len(err.splitlines()) == 1
    # was: --runtime was ignored for an artifact folder, so this ran (and reported) eager as onnxruntime
    code, _, err = run(capsys, "run", art, "--runtime", "onnxruntime", "--random-inputs")
    assert code == 2 and "is the eager artifact, not onnxruntime" in err
    code, _, err = run(capsys, "run", art, "--runtime", "bogus", "--random-inputs")
    assert code != 0 and "unknown runtime 'bogus'" in err
    code, out, _ = run(capsys, "run", art, "--runtime", "eager", "--random-inputs", "--repeat", "1")
    assert code == 0 and '"runtime": "eager"' in out  # near miss: the artifact's own runtime
    code, _, err = run(capsys, "inspect", "dlrm:tiny", "--plot", str(tmp_path / "peak.txt"))
    assert code == 2 and "name a .png (or .svg, .pdf) file" in err
    # was: "eager | load: unknown option 'microbatches'"
    code, _, err = run(capsys, "serve-stages", art)
    assert code == 2 and f"{art} was lowered for eager; serve-stages serves split models" in err


def test_sigterm_removes_the_partial_output(tmp_path):
    """Was: a SIGTERM (what `timeout` and schedulers send) left OUT's hidden temporary folder behind;
    it now unwinds like Ctrl-C, exits 143 and leaves nothing."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "graphopt", "optimize", "bert4rec:tiny", "-p", "O2", "-o",
                             str(tmp_path / "o"), "--runtime", "onnxruntime"], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".o.tmp") for p in tmp_path.iterdir()) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "graphopt: terminated" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
