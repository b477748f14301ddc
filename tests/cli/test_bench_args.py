"""``graphopt bench`` arguments that cannot give a correct report are refused before any work."""

from __future__ import annotations

from graphopt.cli import main


def _err(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_two_pipelines_under_one_label_are_refused(tmp_path, capsys):
    """Was: exit 0 with one row carrying the second pipeline's timing and top-10 beside the first's size."""
    code, err = _err(capsys, "bench", "bert4rec:tiny", "-p", "a=O2", "-p", "a=O2,quantize-int8", "--runtimes", "eager",
                     "--batch-sizes", "2", "--seq-lens", "8", "--quick", "--no-memory", "-o", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "two pipelines are labelled 'a' (O2 and O2,quantize-int8); give each its own LABEL=PIPELINE" in err
    assert not (tmp_path / "r").exists()


def test_a_sequence_length_past_the_positions_is_refused_up_front(tmp_path, capsys):
    """Was: the seq-16 shape built and timed, then an 'unexpected' RuntimeError at seq 600 lost the run."""
    code, err = _err(capsys, "bench", "bert4rec:tiny", "-p", "O1", "--runtimes", "eager", "--batch-sizes", "2",
                     "--seq-lens", "16,600", "--quick", "--no-memory", "-o", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--seq-lens 600: bert4rec:tiny takes seq in [1, 512]; pick sizes within it" in err
    assert not (tmp_path / "r").exists()
