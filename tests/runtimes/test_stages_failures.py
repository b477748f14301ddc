"""stages runtime, audit findings: a rank serving another artifact is refused
(not a silent wrong answer); a silent MASTER_PORT fails within the join
timeout; a dead or stalled stage fails the run (and stats) promptly, naming
it; split-stages{n=1} is answered with "n >= 2". Real processes, gloo on
127.0.0.1, tiny models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from graphopt.runtimes.stages import load_stages, lower_stages

from graphopt import optimize
from graphopt.errors import PreconditionError, RunnerError
from tests.runtimes.test_stages import _alive, _free_port

#: rank 0's teardown used to wait a fixed 10 s for ranks never told to stop;
#: a failure must now come well before that (it takes about a second)
PROMPT_S = 8
BOUND_S = 30


def _serve_rank1(artifact_path, port: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen(
        [sys.executable, "-m", "graphopt", "serve-stages", str(artifact_path), "--threads", "1", *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def dlrm2(program, tmp_path_factory):
    p, _ = optimize(program("dlrm:tiny"), "split-stages{n=2}", verify_each=False)
    return p, lower_stages(p, tmp_path_factory.mktemp("stages") / "dlrm2")


def test_rank_serving_another_artifact_is_refused_on_both_sides(dlrm2, tmp_path):
    """Same model, same cut, other weights (another checkpoint / a stale copy):
    rank 0 refuses rank 1 at join, naming it, instead of returning wrong scores."""
    program, artifact = dlrm2
    other = program.copy()
    with torch.no_grad():
        for param in other.gm.parameters():
            param.add_(0.5)
    stale = lower_stages(other, tmp_path / "stale")
    port = _free_port()
    worker = _serve_rank1(stale.path, port, "--join-timeout", "30")
    try:
        runner = load_stages(artifact.path, launch="external", master_port=port, join_timeout=30, threads=1)
        start = time.monotonic()
        with pytest.raises(RunnerError) as info:
            runner.activate()
        assert time.monotonic() - start < BOUND_S
        message = str(info.value)
        assert "\n" not in message
        assert "rank 1 serves a different artifact than rank 0 (stage0.pt2 sha256" in message
        assert f"copy the same artifact folder ({artifact.path}) to every host and restart rank 1" in message
        assert not runner.is_active
        _, err = worker.communicate(timeout=BOUND_S)
        assert worker.returncode == 1
        line = [ln for ln in err.splitlines() if ln.startswith("graphopt: error:")]
        assert line and "rank 1 serves a different artifact than rank 0" in line[0], err[-2000:]
        assert "copy the same artifact folder" in line[0]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_silent_master_port_fails_within_the_join_timeout(dlrm2):
    """MASTER_PORT accepts the connection but never answers (another service, a
    stopped rank 0): the rank fails within --join-timeout with one line."""
    _, artifact = dlrm2
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes the handshake; nothing ever answers
        port = listener.getsockname()[1]
        worker = _serve_rank1(artifact.path, port, "--join-timeout", "3")
        try:
            _, err = worker.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()
            pytest.fail("serve-stages hung past --join-timeout on a silent MASTER_PORT")
    assert worker.returncode == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("graphopt: error:")]
    assert len(errors) == 1, err[-2000:]
    assert f"rank 1 could not reach rank 0 at tcp://127.0.0.1:{port} within 3s" in errors[0]
    assert "start rank 0 first or check MASTER_ADDR/MASTER_PORT" in errors[0]
    assert "frame #" not in err


def test_stats_after_a_stage_died_names_it(dlrm2):
    program, artifact = dlrm2
    with load_stages(artifact.path, timeout=10, join_timeout=20, threads=1) as runner:
        runner(*program.sample_inputs(batch=4))
        pid = runner.stats()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        start = time.monotonic()
        with pytest.raises(RunnerError, match=rf"stage 1 \(rank 1, pid {pid}\) exited with code -9"):
            runner.stats()
        assert time.monotonic() - start < PROMPT_S
        with pytest.raises(RunnerError, match="stopped after an earlier failure"):
            runner.stats()


def test_a_stalled_stage_fails_the_run_within_its_timeout(dlrm2):
    """A stopped (SIGSTOP) stage: rank 0 fails once ``timeout`` runs out, and
    then ends the stage instead of waiting on it."""
    program, artifact = dlrm2
    timeout = 4
    runner = load_stages(artifact.path, timeout=timeout, join_timeout=20, threads=1)
    with runner:
        runner(*program.sample_inputs(batch=4))
        pid = runner.stats()[1]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(RunnerError, match=r"run failed: .*; the other stages were stopped"):
                runner(*program.sample_inputs(batch=4))
            assert time.monotonic() - start < timeout + 5
            assert not _alive(pid) or _zombie(pid), "the stalled stage must be ended"
        finally:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_three_stages_a_killed_stage_fails_promptly_and_stops_the_others(program, tmp_path):
    p, _ = optimize(program("dlrm:tiny"), "split-stages{n=3}", verify_each=False)
    artifact = lower_stages(p, tmp_path / "dlrm3")
    runner = load_stages(artifact.path, microbatches=2, timeout=30, join_timeout=60, threads=1)
    with runner:
        runner(*p.sample_inputs(batch=4))
        ranks = runner.stats()
        victim, survivor = ranks[2]["pid"], ranks[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.5)
        start = time.monotonic()
        with pytest.raises(RunnerError, match=rf"stage 2 \(rank 2, pid {victim}\) exited with code -9"):
            runner(*p.sample_inputs(batch=4))
        assert time.monotonic() - start < PROMPT_S
        assert not _alive(survivor), "the healthy stage must be stopped with the failed run"


def test_one_stage_split_says_stages_needs_two(program, tmp_path):
    p, _ = optimize(program("dlrm:tiny"), "split-stages{n=1}", verify_each=False)
    with pytest.raises(PreconditionError, match=r"needs split-stages with n >= 2") as info:
        lower_stages(p, tmp_path / "out")
    assert "split-stages{n=1}" in str(info.value) and "'split-stages{n=2}' or more" in str(info.value)
    assert not (tmp_path / "out").exists()
