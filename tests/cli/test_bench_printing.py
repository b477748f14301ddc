"""``graphopt bench``'s printed tables show text from the report as written: reasons, labels and
notes are not rich markup (``pip install 'graphopt[tensorrt]'`` printed as ``'graphopt'``)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import graphopt
from graphopt.cli.bench import print_tables


def test_reasons_and_labels_print_as_written(zoo):
    if graphopt.available_runtimes()["tensorrt"].available:
        pytest.skip("TensorRT is installed here: its row runs instead of carrying the install hint")
    report = graphopt.bench(zoo("bert4rec:tiny"), ["x[1]=none"], ["eager", "tensorrt"], peers=[],
                            batch_sizes=[2], seq_lens=[8], quick=True, memory=False)
    skipped = report.variant("x[1] @ tensorrt")
    assert skipped["status"] == "skipped" and "graphopt[tensorrt]" in skipped["reason"]
    out = io.StringIO()
    print_tables(report, Console(file=out, width=400, color_system=None))
    printed = out.getvalue()
    assert f"x[1] @ tensorrt: skipped: {skipped['reason']}" in printed
    assert "x[1] @ eager" in printed
