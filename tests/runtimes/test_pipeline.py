"""pipeline runtime: stages in separate processes (gloo on 127.0.0.1), GPipe
micro-batches, outputs equal to the single-process Program; clear failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from graphopt.runtimes.pipeline import load_pipeline, lower_pipeline, run_sequential, serve_stage

from graphopt import optimize
from graphopt.errors import GraphoptError, RunnerError

TOL = 1e-5
BOUND_S = 20  # a failed stage must fail the run within this (timeout=10 below; gloo usually sees it at once)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def bert_artifact(program, tmp_path_factory):
    split, _ = optimize(program("bert4rec:tiny"), "split-stages{balance=flops}", verify_each=False)
    out = tmp_path_factory.mktemp("pipe") / "bert4rec"
    artifact = lower_pipeline(split, out)
    return split, artifact


@pytest.fixture(scope="module")
def dlrm_artifact(program, tmp_path_factory):
    p = program("dlrm:tiny")
    out = tmp_path_factory.mktemp("pipe") / "dlrm"
    return p, lower_pipeline(p, out, stages=2)


def _assert_matches(runner, program, batch, seq=None, seed=0):
    inputs = program.sample_inputs(batch=batch, seq=seq, seed=seed)
    outputs = runner(*inputs)
    reference = program(*inputs)
    assert len(outputs) == len(reference)
    for out, ref in zip(outputs, reference):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)


def test_lowering_writes_one_program_per_stage(bert_artifact):
    split, artifact = bert_artifact
    manifest = artifact.manifest
    assert manifest["runtime"] == "pipeline"
    assert artifact.backend["num_stages"] == 2
    assert sorted(manifest["files"]) == ["stage0.pt2", "stage1.pt2"]
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    # the cut is the one split-stages recorded, not a new one
    assert artifact.backend["cuts"] == split.meta["graphopt.stages"]["cuts"]
    stages = artifact.backend["stages"]
    assert stages[0]["inputs"] == ["input_ids", "attention_mask"]
    assert stages[1]["outputs"] == ["output"]
    assert stages[0]["outputs"] == stages[1]["inputs"]
    # the stages run in sequence in one process equal the Program
    inputs = split.sample_inputs(batch=3, seq=9, seed=2)
    torch.testing.assert_close(
        run_sequential(artifact.path, inputs)[0], split(*inputs)[0], atol=TOL, rtol=TOL
    )


def test_bert4rec_two_processes_match_single_process(bert_artifact):
    split, artifact = bert_artifact
    with load_pipeline(artifact.path, microbatches=2, timeout=30, join_timeout=60) as runner:
        _assert_matches(runner, split, batch=4)
        _assert_matches(runner, split, batch=6, seq=9, seed=1)  # a new shape builds a new schedule
        with pytest.raises(RunnerError, match="batch 5 cannot be cut into 2 equal micro-batches"):
            runner(*split.sample_inputs(batch=5))
        _assert_matches(runner, split, batch=2, seed=3)  # micro-batches of 1; still usable after refusal
        ranks = runner.stats()
        assert [r["rank"] for r in ranks] == [0, 1]
        assert ranks[1]["pid"] != os.getpid()
        assert sum(r["parameter_bytes"] for r in ranks) >= split.parameter_bytes()
    assert not _alive(ranks[1]["pid"]), "the spawned stage must exit with the runner"


def test_dlrm_two_processes_and_a_killed_local_stage(dlrm_artifact):
    program, artifact = dlrm_artifact
    runner = load_pipeline(artifact.path, microbatches=4, timeout=10, join_timeout=60)
    with runner:
        _assert_matches(runner, program, batch=8)
        _assert_matches(runner, program, batch=4, seed=1)
        pid = runner.stats()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RunnerError, match=rf"stage 1 \(rank 1, pid {pid}\) exited with code -9"):
            runner(*program.sample_inputs(batch=8))
        assert time.monotonic() - start < BOUND_S
        with pytest.raises(RunnerError, match="stopped after an earlier failure"):
            runner(*program.sample_inputs(batch=8))


def test_killed_remote_stage_fails_the_run_within_bounded_time(dlrm_artifact):
    """Rank 1 started like on another host (`graphopt serve-pipeline` + torchrun
    variables); after it dies mid-session, rank 0's next run fails instead of hanging."""
    program, artifact = dlrm_artifact
    port = _free_port()
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker = subprocess.Popen(
        [sys.executable, "-m", "graphopt", "serve-pipeline", str(artifact.path), "--timeout", "10"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        runner = load_pipeline(
            artifact.path, launch="external", master_port=port, timeout=10, join_timeout=60
        )
        with runner:
            _assert_matches(runner, program, batch=4)
            worker.kill()
            worker.wait(timeout=10)
            start = time.monotonic()
            with pytest.raises(RunnerError, match="rank 0 \\(stage 0\\) lost its peers"):
                runner(*program.sample_inputs(batch=4))
            assert time.monotonic() - start < BOUND_S
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_rank_that_never_joins_names_the_address(dlrm_artifact):
    _, artifact = dlrm_artifact
    port = _free_port()
    runner = load_pipeline(artifact.path, launch="external", master_port=port, join_timeout=1.5)
    start = time.monotonic()
    with pytest.raises(RunnerError, match=rf"rank 1 of 2 did not join within 1.5s at tcp://127.0.0.1:{port}"):
        runner.activate()
    assert time.monotonic() - start < BOUND_S
    assert not runner.is_active
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_stage_that_cannot_reach_rank0_names_the_address(dlrm_artifact):
    _, artifact = dlrm_artifact
    port = _free_port()
    with pytest.raises(
        RunnerError, match=rf"rank 1 could not reach rank 0 at tcp://127.0.0.1:{port} within 1s"
    ):
        serve_stage(artifact.path, 1, 2, "127.0.0.1", port, join_timeout_s=1)


def test_world_size_must_match_stage_count(dlrm_artifact):
    _, artifact = dlrm_artifact
    with pytest.raises(RunnerError, match="has 2 stages, so WORLD_SIZE must be 2, got 3"):
        serve_stage(artifact.path, 1, 3, "127.0.0.1", 1, join_timeout_s=1)


def test_too_many_stages_fails_lowering(program, tmp_path):
    with pytest.raises(GraphoptError, match="splittable points"):
        lower_pipeline(program("dlrm:tiny"), tmp_path / "out", stages=200)
    assert not (tmp_path / "out").exists()


def test_one_stage_runs_in_process(dlrm_artifact, program, tmp_path):
    p = program("dlrm:tiny")
    artifact = lower_pipeline(p, tmp_path / "one", stages=1)
    assert artifact.backend["num_stages"] == 1
    with load_pipeline(artifact.path, microbatches=2) as runner:
        _assert_matches(runner, p, batch=6)


def test_cli_rank_without_world_size_is_an_error(dlrm_artifact, capsys, monkeypatch):
    from graphopt.cli import main

    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    _, artifact = dlrm_artifact
    assert main(["serve-pipeline", str(artifact.path), "--rank", "1"]) == 1
    assert "needs WORLD_SIZE and MASTER_PORT" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def test_serving_stage_exits_when_rank0_dies(dlrm_artifact, tmp_path):
    """Rank 0 (`graphopt serve-pipeline`, spawning rank 1 here) is killed mid-run:
    rank 1 must exit on its own within bounded time, not wait forever."""
    _, artifact = dlrm_artifact
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["TMPDIR"] = str(tmp_path)  # rank 1's log, which the killed rank 0 cannot delete
    rank0 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "graphopt",
            "serve-pipeline",
            str(artifact.path),
            "--iterations",
            "100000000",
            "--timeout",
            "10",
            "--microbatches",
            "2",
            "--batch",
            "4",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    rank1 = None
    try:
        lines = []
        for line in rank0.stderr:  # third-party warnings first; then this line once all ranks joined
            lines.append(line)
            if "pipeline ranks joined" in line or "error" in line:
                break
        assert "pipeline ranks joined at tcp://127.0.0.1:" in lines[-1], "".join(lines[-5:])
        (rank1,) = _children(rank0.pid)
        time.sleep(0.5)  # let it get into the run loop
        rank0.kill()
        rank0.wait(timeout=10)
        start = time.monotonic()
        while _alive(rank1) and not _zombie(rank1) and time.monotonic() - start < BOUND_S:
            time.sleep(0.1)
        assert not _alive(rank1) or _zombie(rank1), "rank 1 kept running after rank 0 died"
    finally:
        for pid in (rank0.pid, rank1):
            if pid and _alive(pid) and not _zombie(pid):
                os.kill(pid, signal.SIGKILL)
        rank0.wait()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
