"""stages runtime: stages in separate processes (gloo on 127.0.0.1), GPipe
micro-batches, outputs equal to the single-process Program; clear failures;
lowering needs a split-stages partition; the old name `pipeline` still works."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from graphopt.runtimes.stages import StagesRunner, load_stages, lower_stages, run_sequential, serve_stage

from graphopt import optimize
from graphopt.errors import PreconditionError, RunnerError
from graphopt.passlib.partition import stage_partition
from graphopt.runtime import load, lower, runtime_names
from graphopt.runtime.artifact import write_manifest

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
    out = tmp_path_factory.mktemp("stages") / "bert4rec"
    graph, partition = str(split.graph), stage_partition(split)
    artifact = lower_stages(split, out)
    # lowering reads the caller's Program and leaves it as it was
    assert str(split.graph) == graph and stage_partition(split) == partition
    return split, artifact


@pytest.fixture(scope="module")
def dlrm_artifact(program, tmp_path_factory):
    p, _ = optimize(program("dlrm:tiny"), "split-stages{n=2}", verify_each=False)
    out = tmp_path_factory.mktemp("stages") / "dlrm"
    return p, lower_stages(p, out, stages=2)


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
    assert manifest["runtime"] == "stages"
    assert artifact.backend["num_stages"] == 2
    assert sorted(manifest["files"]) == ["stage0.pt2", "stage1.pt2"]
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    # the cut is the one split-stages recorded, not a new one
    assert artifact.backend["cuts"] == list(stage_partition(split).cuts)
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
    with load_stages(artifact.path, microbatches=2, timeout=30, join_timeout=60) as runner:
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
    runner = load_stages(artifact.path, microbatches=4, timeout=10, join_timeout=60)
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
    """Rank 1 started like on another host (`graphopt serve-stages` + torchrun
    variables); after it dies mid-session, rank 0's next run fails instead of hanging."""
    program, artifact = dlrm_artifact
    port = _free_port()
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker = subprocess.Popen(
        [sys.executable, "-m", "graphopt", "serve-stages", str(artifact.path), "--timeout", "10"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        runner = load_stages(
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
    runner = load_stages(artifact.path, launch="external", master_port=port, join_timeout=1.5)
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


def test_unpartitioned_program_fails_lowering_naming_split_stages(program, tmp_path):
    p = program("dlrm:tiny")
    with pytest.raises(
        PreconditionError, match=r"^runtime 'stages' needs a partitioned Program: add 'split-stages\{n=2\}'"
    ):
        lower_stages(p, tmp_path / "out")
    with pytest.raises(PreconditionError, match=r"add 'split-stages\{n=200\}'"):
        lower_stages(p, tmp_path / "out", stages=200)
    assert not (tmp_path / "out").exists()
    assert stage_partition(p) is None and "graphopt.stages" not in p.meta  # the lowerer did not partition it


def test_stage_count_must_match_the_partition(dlrm_artifact, tmp_path):
    p, _ = dlrm_artifact
    with pytest.raises(PreconditionError, match=r"partitioned into 2 stages, not 3; run 'split-stages\{n=3\}'"):
        lower_stages(p, tmp_path / "out", stages=3)
    assert not (tmp_path / "out").exists()


def test_one_stage_runs_in_process(dlrm_artifact, program, tmp_path):
    p = program("dlrm:tiny")
    artifact = lower_stages(p, tmp_path / "one", stages=1)
    assert artifact.backend["num_stages"] == 1
    with load_stages(artifact.path, microbatches=2) as runner:
        _assert_matches(runner, p, batch=6)


def test_artifact_lowered_as_pipeline_still_loads(dlrm_artifact, tmp_path, caplog):
    """A manifest naming the runtime by its old name 'pipeline' loads (quietly), and both ranks
    run it (re-stamped with its digest: one written before the digest is format /1, re-lowered)."""
    program, artifact = dlrm_artifact
    old = tmp_path / "old"
    shutil.copytree(artifact.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["runtime"] = "pipeline"
    write_manifest(old, manifest)
    with caplog.at_level(logging.WARNING, logger="graphopt.runtime.backend"):
        runner = load(old, microbatches=2, timeout=10, join_timeout=60)
    assert isinstance(runner, StagesRunner) and not caplog.records
    with runner:
        _assert_matches(runner, program, batch=4)
    with pytest.raises(RunnerError, match="has 2 stages, so WORLD_SIZE must be 2, got 3"):
        serve_stage(old, 1, 3, "127.0.0.1", 1, join_timeout_s=1)


def test_old_name_pipeline_resolves_with_a_deprecation_note(program, tmp_path, caplog):
    assert "stages" in runtime_names() and "pipeline" not in runtime_names()
    p = program("dlrm:tiny")
    with caplog.at_level(logging.WARNING, logger="graphopt.runtime.backend"):
        artifact = lower(p, "pipeline", tmp_path / "old", stages=1)
    assert artifact.runtime == "stages" and artifact.manifest["runtime"] == "stages"
    notes = [r.getMessage() for r in caplog.records if "pipeline" in r.getMessage()]
    assert notes == ["runtime 'pipeline' is now 'stages'; the old name will be removed"]


def test_cli_rank_without_world_size_is_an_error(dlrm_artifact, capsys, monkeypatch):
    from graphopt.cli import main

    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    _, artifact = dlrm_artifact
    assert main(["serve-stages", str(artifact.path), "--rank", "1"]) == 1
    err = capsys.readouterr().err
    assert "needs WORLD_SIZE and MASTER_PORT" in err and "serve-pipeline" not in err
    # the verb's old name still works, with a one-line note
    assert main(["serve-pipeline", str(artifact.path), "--rank", "1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "graphopt: `serve-pipeline` is now `serve-stages`; the old name will be removed"
    assert "needs WORLD_SIZE and MASTER_PORT" in err[1]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def test_serving_stage_exits_when_rank0_dies(dlrm_artifact, tmp_path):
    """Rank 0 (`graphopt serve-stages`, spawning rank 1 here) is killed mid-run:
    rank 1 must exit on its own within bounded time, not wait forever."""
    _, artifact = dlrm_artifact
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["TMPDIR"] = str(tmp_path)  # rank 1's log, which the killed rank 0 cannot delete
    rank0 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "graphopt",
            "serve-stages",
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
            if "stage ranks joined" in line or "error" in line:
                break
        assert "stage ranks joined at tcp://127.0.0.1:" in lines[-1], "".join(lines[-5:])
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
