"""``graphopt inspect MODEL --memory``: tables, JSON, the plot, and its errors."""

from __future__ import annotations

import json

import pytest

from graphopt.cli import main
from graphopt.transform.memory import analyze_memory


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved(program, tmp_path_factory):
    """dlrm:tiny saved once: each CLI call loads it instead of capturing again."""
    return str(program("dlrm:tiny").save(tmp_path_factory.mktemp("inspect") / "dlrm_tiny.pt2"))


def test_memory_json_matches_the_analysis(capsys, program, saved):
    code, out, err = run(capsys, "inspect", saved, "--memory", "--batch-sizes", "1,64", "--seq-lens", "50", "--json")
    assert code == 0, err
    data = json.loads(out)
    expected = analyze_memory(program("dlrm:tiny"))
    assert [e["sizes"] for e in data["estimates"]] == [{"batch": 1}, {"batch": 64}]
    assert [e["activation_peak_bytes"] for e in data["estimates"]] == [expected.at(batch=b).activations for b in (1, 64)]
    assert data["weights"]["total_bytes"] == expected.weight_bytes
    assert {r["kind"] for r in data["weights"]["by_kind"]} == {"embedding", "dense", "other"}
    assert data["activation_peak_bytes"] == str(expected.peak_expr)
    assert "dlrm:tiny has no dynamic 'seq' dim; --seq-lens ignored" in data["notes"]


def test_memory_tables_and_plot(tmp_path, capsys, saved):
    plot = tmp_path / "peak.png"
    code, out, err = run(capsys, "inspect", saved, "--batch-sizes", "1,32,256", "--plot", str(plot))
    assert code == 0, err
    assert "activation peak (bytes) = " in out and "batch" in out
    assert "weights + peak" in out and "largest tensors live at the peak (batch=256)" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run(capsys, "inspect", saved, "--plot", str(plot))  # never overwritten silently
    assert code == 2 and "exists; pass --force" in err and err.count("\n") == 1
    assert run(capsys, "inspect", saved, "--plot", str(plot), "--force")[0] == 0
    code, _, err = run(capsys, "inspect", saved, "--plot", str(tmp_path / "no" / "such.png"))
    assert code == 2 and "no folder" in err
    with pytest.raises(SystemExit) as e:  # argparse: exit 2 with one line
        main(["inspect", saved, "--batch-sizes", "0,4"])
    assert e.value.code == 2 and "expected positive integers" in capsys.readouterr().err


def test_sizes_the_program_cannot_run_are_refused(capsys, program, tmp_path):
    """Was: a prediction (8.8 MiB, exit 0) at seq 600, where the Program itself fails its guard
    ``seq <= 512`` (bert4rec:tiny's position table)."""
    saved = str(program("bert4rec:tiny").save(tmp_path / "b4r.pt2"))
    code, _, err = run(capsys, "inspect", saved, "--memory", "--seq-lens", "64,600")
    assert code == 2 and err.count("\n") == 1
    assert "--seq-lens 600: bert4rec:tiny takes seq in [1, 512]; pick sizes within it" in err
    code, out, err = run(capsys, "inspect", saved, "--memory", "--seq-lens", "512", "--json")  # the edge runs
    assert code == 0, err
    assert [e["sizes"]["seq"] for e in json.loads(out)["estimates"]] == [512]


def test_seq_lens_on_a_dim_dynamic_true_labelled_says_how_to_name_it(tmp_path, capsys):
    """Was: under ``dynamic=True`` the sequence dim is labelled ``ids_dim1``; ``inspect`` said only
    "no dynamic 'seq' dim" and ``bench --seq-lens 8,16`` silently measured the captured length."""
    import torch

    import graphopt
    from graphopt.bench.shapes import bench_shapes

    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Flatten(0, -1)).eval()
    prog = graphopt.capture(model, torch.randint(0, 50, (4, 6)))
    assert prog.inputs[0].dynamic == {0: "batch", 1: "input_dim1"}
    expected = ("--seq-lens ignored: no dim of Sequential is labelled 'seq' (its other dynamic dims, input_dim1, run "
                "at their captured sizes); name the sequence dim at capture: dynamic={'input': {1: 'seq'}}")
    notes: list[str] = []
    assert bench_shapes(prog, [2], [8, 16], notes) == [(2, None)] and notes == [expected]
    code, out, err = run(capsys, "inspect", str(prog.save(tmp_path / "p.pt2")), "--seq-lens", "8", "--json")
    assert code == 0, err
    assert expected in json.loads(out)["notes"]
