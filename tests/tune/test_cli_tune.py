"""`graphopt tune` on the command line: what it says when nothing requested worked, SIGTERM's report,
and arguments that are refused (or accepted in their single-value form) before any model is loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import graphopt
from graphopt.cli import main
from graphopt.tune.data import DataSpecError
from graphopt.tune.fidelity import parse_drop
from graphopt.tune.tuner import _check_runtimes, _sizes

ARGS = ["--batch-sizes", "2", "--seq-lens", "16", "--threads", "1", "--budget", "120"]


def test_no_requested_variant_is_a_failure_not_eagers_reference(tmp_path, capsys):
    out = tmp_path / "o"
    # one trial: eager's reference (the baseline) runs, no candidate on torchscript does
    code = main(["tune", "dlrm:tiny", "--runtimes", "torchscript", "--max-trials", "1", *ARGS, "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "no requested variant worked: no candidate on torchscript ran and met the bar" in printed
    assert "best:" not in printed and (out / "report.md").is_file()
    code = main(["tune", "dlrm:tiny", "--runtimes", "eager", "--max-trials", "1", *ARGS, "-o", str(tmp_path / "e")])
    assert code == 0 and "best: none @ eager" in capsys.readouterr().out  # eager requested: its reference counts


def test_sigterm_writes_the_report_like_ctrl_c(tmp_path):
    out = tmp_path / "t"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRAPHOPT_VERIFY_EACH": "0"}
    cmd = [sys.executable, "-m", "graphopt", "tune", "dlrm:tiny", "--runtimes", "eager,torchscript",
           *ARGS[:-2], "--budget", "300", "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        log = out / "trials.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and log.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert proc.returncode == 143 and err.rstrip().endswith("graphopt: terminated"), err[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["confirmation"] == {"done": False, "why": "terminated (SIGTERM); --resume continues"}
    assert "terminated (SIGTERM)" in (out / "report.md").read_text()


@pytest.mark.parametrize("text, value", [("0.5%", 0.005), ("0.005", 0.005), ("2%", 0.02), ("0", 0.0), (0.01, 0.01)])
def test_max_drop_takes_a_percentage_or_a_small_fraction(text, value):
    assert parse_drop(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0.5", 0.5, "0.1"])
def test_a_bare_max_drop_above_5_percent_is_refused_with_how_to_write_it(text):
    with pytest.raises(DataSpecError, match=rf"a bare number is a fraction \({text} = .*%\); write {text}% for"):
        parse_drop(text)


@pytest.mark.parametrize("text", ["5", "2"])
def test_a_bare_max_drop_of_a_whole_number_says_to_add_a_percent_sign(text):
    with pytest.raises(DataSpecError, match=rf"a bare number is a fraction and must be below 1; write {text}% for"):
        parse_drop(text)


def test_runtimes_are_deduplicated_and_stages_is_refused():
    assert _check_runtimes(["eager", "eager"]) == ["eager"]
    assert _check_runtimes("eager") == ["eager"]  # the Python API's single string
    with pytest.raises(DataSpecError, match="--runtimes stages: stages is a deployment layout"):
        _check_runtimes(["eager", "stages"])


def test_batch_sizes_accept_one_int_and_refuse_junk():
    assert _sizes(4, "batch-sizes") == [4] and _sizes((1, 32), "batch-sizes") == [1, 32]
    for bad in (0, 1.5, "x", (), None):
        with pytest.raises(DataSpecError, match="expected positive integers"):
            _sizes(bad, "batch-sizes")


def test_eval_metric_without_data_is_refused_before_loading(tmp_path):
    with pytest.raises(DataSpecError, match="--metric ndcg@10 needs evaluation data"):
        graphopt.tune("nosuch:tiny", tmp_path / "o", metric="ndcg@10")  # an unknown model: never loaded
    assert not (tmp_path / "o").exists()
