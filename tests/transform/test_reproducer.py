"""A failing pass leaves a reproducer, and re-running it fails the same way (same pass,
same message): from Python (``rerun``), with ``graphopt reproduce DIR`` and with the
plain ``graphopt optimize DIR/input.pt2 -p "$(cat DIR/pipeline.txt)"``."""

from __future__ import annotations

import json

import pytest
import torch

import graphopt
from graphopt import PassFailedError, PassResult
from graphopt.cli import main
from graphopt.ir.program import Program
from graphopt.transform.base import Pass, register_pass
from graphopt.transform.manager import PassContext, PassManager
from graphopt.transform.reproducer import rerun

aten = torch.ops.aten
PIPELINE = "remove-dropout,dce,test-fails-on-embedding-bag"


@register_pass
class _FailsOnEmbeddingBag(Pass):
    """Test pass: a real failure on one op (a rewrite that cannot handle embedding_bag)."""

    name = "test-fails-on-embedding-bag"

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        for node in program.gm.graph.nodes:
            if node.target is aten.embedding_bag.padding_idx:
                raise ValueError(f"cannot rewrite {node.name}: embedding_bag with per_sample_weights={node.args[6]}")
        return PassResult(program, modified=False)


@register_pass
class _FailsOnARandomNode(Pass):
    """Test pass: fails on a node it picks at random, naming a calibration statistic (needs the
    saved RNG state and calibration batches to fail the same way)."""

    name = "test-fails-on-a-random-node"
    requires = frozenset({"calibration_data"})

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        draw = float(torch.rand(()))
        total = sum(float(b[0].float().sum()) for b in ctx.calibration_batches())
        raise RuntimeError(f"gave up at draw {draw:.6f} (calibration sum {total:.6g})")


@register_pass
class _FailsOnAGraphWithoutDeadNodes(Pass):
    """Test pass: fails only on a graph with no dead nodes. A saved Program is a re-export,
    which brings back unused ``getitem`` nodes, so only the whole pipeline (dce first) shows it."""

    name = "test-fails-without-dead-nodes"

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        dead = [n for n in program.gm.graph.nodes if n.op == "call_function" and not n.users]
        if not dead:
            raise RuntimeError("no dead nodes to anchor the rewrite")
        return PassResult(program, modified=False)


def _without_where(message: str) -> str:
    return message.split(" (reproducer in ")[0]


def test_rerun_reproduces_the_failure(tmp_path, program, capsys):
    repro = tmp_path / "repro"
    with pytest.raises(PassFailedError) as first:
        graphopt.optimize(program("dlrm:tiny"), PIPELINE, reproducer_dir=str(repro))
    message = str(first.value)
    expected = ("pass 'test-fails-on-embedding-bag' failed (passes before it: remove-dropout, dce): ValueError: "
                "cannot rewrite embedding_bag: embedding_bag with per_sample_weights=None")
    # the test passes live in this module: the printed re-run imports it
    assert message == f"{expected} (reproducer in {repro}; re-run: graphopt reproduce {repro} --import {__name__})"
    assert sorted(p.name for p in repro.iterdir()) == [".graphopt", "data.pt", "input.pt2", "original.pt2",
                                                       "pipeline.txt", "reproducer.json"]
    meta = json.loads((repro / "reproducer.json").read_text())
    assert meta["failing_pass"] == "test-fails-on-embedding-bag" and meta["passes_before"] == ["remove-dropout", "dce"]
    assert meta["pipeline"] == PIPELINE and meta["verify_each"] is True
    assert {"graphopt", "torch", "python", "cpu"} <= set(meta["versions"])

    with pytest.raises(PassFailedError) as again:
        rerun(repro)
    assert str(again.value) == expected
    assert main(["reproduce", str(repro)]) == 1
    assert capsys.readouterr().err.strip() == f"graphopt: error: {expected}"
    # the plain CLI re-run (no saved data) names the same pass with the same detail
    step = (repro / "pipeline.txt").read_text().strip()
    assert main(["optimize", str(repro / "input.pt2"), "-p", step, "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == "graphopt: error: " + expected.replace("remove-dropout, dce", "none")

    # near miss: a step (and a pipeline) that handles the saved input does not "reproduce"
    (repro / "pipeline.txt").write_text("dce\n")
    (repro / "reproducer.json").write_text(json.dumps({**meta, "pipeline": "remove-dropout,dce"}))
    assert main(["reproduce", str(repro)]) == 0
    assert "did not reproduce: test-fails-on-embedding-bag ran without failing" in capsys.readouterr().out


def test_rerun_restores_rng_state_and_calibration_data(tmp_path, program):
    prog = program("dlrm:tiny")
    calibration = [prog.sample_inputs(seed=50 + i) for i in range(3)]
    repro = tmp_path / "repro"
    with pytest.raises(PassFailedError) as first:
        graphopt.optimize(prog, "remove-dropout,test-fails-on-a-random-node", calibration_data=calibration,
                          reproducer_dir=str(repro), seed=3)
    message = _without_where(str(first.value))
    assert "RuntimeError: gave up at draw" in message
    torch.manual_seed(1234)  # the caller's RNG moves on; the reproducer saved its own state
    with pytest.raises(PassFailedError) as again:
        rerun(repro)
    assert str(again.value) == message
    # near miss: the same step on the same input and data, from another RNG state, draws another number
    data = torch.load(repro / "data.pt", weights_only=True)
    torch.manual_seed(4)
    with pytest.raises(PassFailedError) as other:
        PassManager("test-fails-on-a-random-node").run(
            Program.load(repro / "input.pt2"),
            PassContext(calibration_data=data["calibration_data"], passes_run=["remove-dropout"]))
    assert str(other.value) != message and str(other.value).split(" (calibration")[1] == message.split(" (calibration")[1]


def test_rerun_falls_back_to_the_whole_pipeline(tmp_path, program):
    repro = tmp_path / "repro"
    with pytest.raises(PassFailedError) as first:
        graphopt.optimize(program("dlrm:tiny"), "dce,test-fails-without-dead-nodes", reproducer_dir=str(repro))
    expected = _without_where(str(first.value))
    assert expected == ("pass 'test-fails-without-dead-nodes' failed (passes before it: dce): "
                        "RuntimeError: no dead nodes to anchor the rewrite")
    with pytest.raises(PassFailedError) as again:
        rerun(repro)
    assert str(again.value) == expected
    (repro / "original.pt2").unlink()  # the near miss: the step alone passes on the re-exported input
    _, meta = rerun(repro)
    assert meta["failing_pass"] == "test-fails-without-dead-nodes"


def test_reproducer_never_replaces_a_users_folder(tmp_path, program):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(PassFailedError, match=r"\(no reproducer: .*holds something other than an earlier") as info:
        graphopt.optimize(program("dlrm:tiny"), PIPELINE, reproducer_dir=str(user))
    assert "ValueError: cannot rewrite embedding_bag" in str(info.value)  # the real failure is still the message
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"] and (user / "notes.txt").read_text() == "keep"


def test_reproducer_replaces_an_earlier_reproducer_and_never_another_output(tmp_path, program):
    """Was: --reproducer over an earlier optimize output (its Program and artifacts) replaced it, no --force."""
    from graphopt.outputs import atomic_directory

    earlier = tmp_path / "out"
    with atomic_directory(earlier, kind="optimize") as tmp:
        (tmp / "program.pt2").write_bytes(b"an earlier optimize output")
    with pytest.raises(PassFailedError, match=r"no reproducer: --reproducer .*out holds something other than an"):
        graphopt.optimize(program("dlrm:tiny"), PIPELINE, reproducer_dir=str(earlier))
    assert (earlier / "program.pt2").read_bytes() == b"an earlier optimize output"
    repro = tmp_path / "repro"
    for _ in range(2):  # the second failure replaces the first one's reproducer
        with pytest.raises(PassFailedError, match=r"\(reproducer in "):
            graphopt.optimize(program("dlrm:tiny"), PIPELINE, reproducer_dir=str(repro))
    assert (repro / "input.pt2").is_file()
