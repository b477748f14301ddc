"""graphopt.tune end to end on dlrm:tiny with the cheap runtimes (onnxruntime, torchscript).

One real run (module fixture: the reference, the six defaults and one more
trial, real torch.export / ONNX Runtime, top-10 overlap against eager on
held-out batches) is shared by the checks; it is resumed under a budget too
small for more than one new trial (the budget rule), and a third real run in
a subprocess is killed with SIGKILL and resumed. The main run is bounded by
``max_trials`` rather than its budget so that a loaded machine makes it slower,
never different.
Timings are never asserted: the winner-vs-default check compares ratios
measured together in the tuner's own confirmation run (both re-timed,
interleaved, in one run), which is how the tuner picks its winner, so timing
noise cannot make the check fail unless that selection is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.bench.timing import TimingConfig
from graphopt.errors import ArtifactError
from graphopt.metrics import agreement
from graphopt.transform.base import get_pass
from graphopt.transform.pipeline import parse_pipeline
from graphopt.tune.trials import FAILED, OK, TrialLog

MAX_TRIALS = 8
MODEL = "dlrm:tiny"  # the cheapest zoo model to export; its scores rank the rows of a batch
RUNTIMES = ["onnxruntime", "torchscript"]  # onnxruntime first: its refusal of bf16 comes early in the defaults
SHAPES = {"batch_sizes": (1, 16), "seq_lens": (16,)}
QUICK = TimingConfig(warmup=1, rounds=3, round_time_s=0.0, max_calls=2)
CONFIRM = TimingConfig(warmup=1, rounds=4, round_time_s=0.0, max_calls=2)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, program):
    # verify-each (on in every test) re-runs the model after each of O2's passes in every screen: the passes
    # have their own tests, and here it would triple the screening cost
    os.environ["GRAPHOPT_VERIFY_EACH"] = "0"
    prog = program(MODEL)
    out = tmp_path_factory.mktemp("tune") / "out"
    start = time.monotonic()
    try:
        with pytest.MonkeyPatch.context() as mp:
            # the same space on every CPU (a CPU without bf16 kernels leaves the bf16 settings out:
            # tests/tune/test_space.py), so bf16 @ onnxruntime is the refused candidate below
            mp.setattr("graphopt.hardware.has_bf16_kernels", lambda: True)
            result = graphopt.tune(prog, out, runtimes=RUNTIMES, **SHAPES, budget=900, max_trials=MAX_TRIALS,
                                   timing=QUICK, confirm_timing=CONFIRM, seed=0)
    finally:
        os.environ["GRAPHOPT_VERIFY_EACH"] = "1"
    return result, time.monotonic() - start, prog


def check_best_folder(best: Path, prog: graphopt.Program, inputs: tuple[torch.Tensor, ...]) -> dict:
    """best/ loads, its manifest says how it was made, and its outputs are what that says."""
    manifest = json.loads((best / "manifest.json").read_text())
    section = manifest["tune"]
    for key in ("pipeline", "runtime", "options", "fidelity", "latency", "speedup", "metric"):
        assert key in section, key
    assert section["fidelity"]["meets"] and section["runtime"] == manifest["runtime"]
    with graphopt.load(best) as runner:
        (scores,) = runner(*inputs)
    (eager,) = prog(*inputs)
    steps = parse_pipeline(section["pipeline"]) if section["pipeline"] else []
    if all(get_pass(p.name).exact for p in steps):  # fp32 pipelines: the same numbers as eager
        torch.testing.assert_close(scores, eager, atol=1e-4, rtol=1e-4)
    else:  # approximate pipelines: the ranking the manifest vouches for (rows of the batch for dlrm)
        assert agreement("topk_overlap", (scores,), (eager,), 10) >= 0.99
    return section


def test_trials_are_logged_with_what_they_measured(tuned):
    result, _, _ = tuned
    lines = [json.loads(x) for x in (result.out_dir / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == len(result.trials) == MAX_TRIALS
    assert [x["n"] for x in lines] == list(range(1, len(lines) + 1))
    for line in lines:
        for key in ("key", "pipeline", "runtime", "options", "fidelity", "latency", "compile_s", "status", "reason"):
            assert key in line
        if line["status"] == OK:
            assert line["fidelity"]["meets"] and line["latency"] and line["objective"] > 0
            assert line["compile_s"] > 0 or line["twin_of"] is not None  # a twin reuses its twin's build
    assert lines[0]["key"] == "none @ eager" and lines[0]["stage"] == "reference"


def test_a_failing_candidate_is_recorded_and_skipped(tuned):
    result, _, _ = tuned
    failed = [t for t in result.trials if t.candidate.runtime == "onnxruntime" and t.candidate.family == "bf16"]
    assert failed, "bf16 @ onnxruntime was not tried within the budget"
    t = failed[0]
    assert t.status == FAILED and t.reason.startswith("onnxruntime |") and "\n" not in t.reason
    assert "bfloat16" in t.reason or "bf16" in t.reason
    assert [x for x in result.trials if x.n > t.n], "the search stopped at the failure"


def test_winner_is_at_least_as_fast_as_the_best_default_at_the_same_bar(tuned):
    result, _, _ = tuned
    conf = result.confirmation
    assert conf.get("done"), conf
    rows = conf["finalists"]
    defaults = [r for r in rows if r["default"]]
    assert defaults, "the best default variant was not among the finalists"
    evaluated_defaults = [t for t in result.trials if t.stage == "defaults" and t.ok]
    best_default = max(evaluated_defaults, key=lambda t: t.objective)
    assert best_default.n in {r["n"] for r in rows}  # the strongest default by the search is re-timed too
    winner = next(r for r in rows if r["n"] == result.best_trial.n)
    assert all(winner["objective"] >= r["objective"] for r in rows)  # same run, same rounds, ratios vs eager
    for r in rows:  # every finalist met the bar on its own runtime
        t = next(x for x in result.trials if x.n == r["n"])
        assert (t.runtime_fidelity or t.fidelity)["meets"]


def test_best_folder_loads_and_holds_the_winner(tuned):
    result, _, prog = tuned
    section = check_best_folder(result.out_dir / "best", prog, prog.sample_inputs(batch=32, seed=99))
    assert section["key"] == result.best_trial.key and section.get("confirmed")
    assert result.best.runtime == result.best_trial.candidate.runtime


def test_resume_replays_finished_trials_and_the_budget_binds(tuned, tmp_path, monkeypatch):
    result, _, prog = tuned
    monkeypatch.setattr("graphopt.hardware.has_bf16_kernels", lambda: True)  # the space the fixture tuned in
    out = tmp_path / "resumed"
    shutil.copytree(result.out_dir, out)
    lines = (out / "trials.jsonl").read_text().splitlines(keepends=True)
    (out / "trials.jsonl").write_text("".join(lines[:5]) + lines[5][:30])  # killed while writing trial 6
    budget = 2.0
    start = time.monotonic()
    again = graphopt.tune(prog, out, runtimes=RUNTIMES, **SHAPES, budget=budget, timing=QUICK,
                          confirm_timing=CONFIRM, seed=0, resume=True)
    wall = time.monotonic() - start
    replayed = [t for t in again.trials if t.resumed]
    new = [t for t in again.trials if not t.resumed]
    assert [t.key for t in replayed] == [t.key for t in result.trials[:5]]  # same order, answered from the log
    assert all(t.n > 5 for t in new) and len(new) >= 1
    keys = [json.loads(x)["key"] for x in (out / "trials.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 5 + len(new)  # nothing finished ran twice; the torn line is gone
    # the budget: a trial is started only while it fits, so the run ends within 10% or one trial of it
    started = [t for t in new if t.twin_of is None and t.compile_s > 0]
    longest = max((t.wall_s for t in started), default=0.0)
    assert len(started) <= 1 or all(t.wall_s < budget for t in started[1:])
    assert wall <= max(budget * 1.1, budget + longest) + 3.0  # + loading the reference and writing the report


def test_report_has_the_winner_pareto_plot_and_runtimes(tuned):
    result, _, _ = tuned
    text = (result.out_dir / "report.md").read_text()
    for part in ("## Winner", "## Best per runtime", "pareto.png", "## Per-layer sensitivity", "## Trials", "onnxruntime"):
        assert part in text
    png = (result.out_dir / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (result.out_dir / ".work").exists()


# ------------------------------------------------------------------ kill and resume
def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "graphopt", "tune", MODEL, "--runtimes", "torchscript", "--batch-sizes", "1,16",
            "--threads", "1", "-o", str(out), *extra]


def test_sigkill_leaves_best_loadable_and_resume_skips_finished_trials(tmp_path, program):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRAPHOPT_VERIFY_EACH": "0"}
    proc = subprocess.Popen(_cli(out, "--budget", "300"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        log = out / "trials.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "best" / "manifest.json").is_file() and log.is_file() and log.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: the next trial is under way
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    prog = program(MODEL)
    check_best_folder(out / "best", prog, prog.sample_inputs(batch=32, seed=5))
    finished = TrialLog(out / "trials.jsonl").read()
    assert finished and finished[0].key == "none @ eager"

    # --resume: the finished trials are answered from the log, not run again
    # the session's Program of the same zoo model (its settings name the model as the CLI did): no second capture
    result = graphopt.tune(prog, out, runtimes=["torchscript"], batch_sizes=(1, 16), budget=1.0, threads=1,
                           timing=QUICK, confirm_timing=CONFIRM, resume=True)  # --resume: the same --threads
    replayed = [t for t in result.trials if t.resumed]
    assert [t.key for t in replayed] == [t.key for t in finished][: len(replayed)] and replayed
    lines = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    keys = [x["key"] for x in lines]
    assert len(keys) == len(set(keys))  # no finished trial was run (and logged) twice
    new = [t for t in result.trials if not t.resumed]
    assert all(t.n > max(f.n for f in finished) for t in new)
    check_best_folder(out / "best", prog, prog.sample_inputs(batch=32, seed=6))


# ------------------------------------------------------------------ output folder rules
def _main(argv: list[str], capsys) -> tuple[int, str]:
    from graphopt.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = int(e.code)
    return code, capsys.readouterr().err


def test_force_never_replaces_a_users_folder_and_resume_needs_a_tune_folder(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for flags in ([], ["--force"]):
        code, err = _main(_cli(user, "--budget", "5", *flags)[3:], capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("graphopt: error:"), err
        assert (user / "notes.txt").read_text() == "keep me"
    with pytest.raises(ArtifactError, match="not a graphopt tune output"):
        graphopt.tune(MODEL, user, resume=True, budget=5)
    assert (user / "notes.txt").read_text() == "keep me"


def test_force_replaces_a_folder_graphopt_wrote(tmp_path):
    from graphopt.tune.tuner import TUNE_FILE, _prepare_out

    out = tmp_path / "old"
    _prepare_out(out, {"model": "a"}, resume=False, force=False)
    (out / "trials.jsonl").write_text('{"n": 1}\n')
    with pytest.raises(ArtifactError, match="already exists"):
        _prepare_out(out, {"model": "b"}, resume=False, force=False)
    _prepare_out(out, {"model": "b"}, resume=False, force=True)
    assert json.loads((out / TUNE_FILE).read_text())["model"] == "b" and not (out / "trials.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("args, message", [
    (["--budget", "soon"], "--budget"),
    (["--max-drop", "150%"], "--max-drop"),
    (["--runtimes", "onnxruntim"], "onnxruntime"),
    (["--resume", "--force"], "not allowed with"),
    (["--metric", "auc"], "--metric"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, args, message):
    code, err = _main(_cli(tmp_path / "o", *args)[3:], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()

