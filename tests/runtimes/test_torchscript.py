"""torchscript: the artifact is shape-generic (script, not trace) and lowering
does not leak TorchScript deprecation warnings."""

from __future__ import annotations

import warnings

import torch

from graphopt.runtime import load, lower


def test_scripted_artifact_runs_at_two_batches_and_two_seq_lengths(program, tmp_path):
    prog = program("bert4rec:tiny")  # captured at batch 4, seq 16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        art = lower(prog, "torchscript", tmp_path / "ts", device="cpu")
        runner = load(art.path).activate()
    assert not [w for w in caught if "TorchScript" in str(w.message) or "torch.jit" in str(w.message)]
    assert art.manifest["backend"]["method"] == "script+freeze"
    for batch in (1, 6):
        for seq in (5, 23):
            feeds = prog.sample_inputs(batch=batch, seq=seq, seed=batch * seq)
            (got,) = runner(*feeds)
            assert got.shape[0] == batch
            torch.testing.assert_close(got, prog(*feeds)[0], atol=1e-5, rtol=1e-5)
    runner.deactivate()


def test_traced_graph_would_bake_the_shape(program):
    """The pitfall the scripted path avoids: sym_size is a graph op in the
    scripted code, not a constant (near miss for the trace approach)."""
    from graphopt.runtimes.torchscript import script_program

    module = script_program(program("dlrm:tiny"))
    assert "aten::sym_size" in str(module.graph) or "aten::size" in str(module.graph)
