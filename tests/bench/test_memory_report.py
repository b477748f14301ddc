"""The report's memory breakdown: predicted next to measured, overhead, and why a
variant needs more memory than eager (rules on the measured records)."""

from __future__ import annotations

import pytest

from graphopt.bench.memory import explain_memory
from graphopt.bench.report import BenchReport
from graphopt.bench.variants import Variant


def _variant(name: str, model: float, load: float, run: float, weights: float, acts: float, mapped: float = 0) -> Variant:
    v = Variant(name, "graphopt" if name != "eager" else "baseline", runtime=name.split(" @ ")[-1])
    v.memory = {"method": "subprocess (alone)", "model_mb": model, "load_mb": load, "run_mb": run,
                "load_file_mb": mapped, "shape": "b32",
                "predicted": {"weights_mb": weights, "activations_mb": acts, "inputs_mb": 0.1, "peak_at": "gelu"}}
    return v


def test_more_than_eager_says_why():
    eager = _variant("eager", model=120, load=100, run=20, weights=96, acts=18)
    prepacked = _variant("O2 @ onnxruntime", model=215, load=200, run=15, weights=96, acts=18)
    arena = _variant("O2 @ eager", model=170, load=98, run=72, weights=96, acts=18)
    mapped = _variant("O2 @ inductor", model=250, load=240, run=10, weights=96, acts=18, mapped=100)
    smaller = _variant("int8 @ onnxruntime", model=60, load=45, run=15, weights=25, acts=18)
    dequant = _variant("int8 @ eager", model=142, load=100, run=42, weights=96, acts=40)
    variants = [eager, prepacked, arena, mapped, smaller, dequant]
    explain_memory(variants)
    assert eager.memory["overhead_mb"] == pytest.approx(120 - 96 - 18)
    assert "why" not in eager.memory and "why" not in smaller.memory  # not more than eager: nothing to explain
    assert prepacked.memory["why"] == [
        "loading holds 200 MB for 96 MB of weights (eager: 100 MB for 96 MB): 100 MB anonymous (copies made while "
        "loading: prepacked or converted weights kept next to the originals, or deserialization buffers the "
        "allocator keeps)"
    ]
    assert arena.memory["why"] == [
        "a run adds 72 MB (eager: 20 MB) where the graph's activations peak at 18.0 MB: memory the runtime or the "
        "allocator holds beyond the live tensors (arenas, workspaces, freed blocks not returned to the system)"
    ]
    (why,) = mapped.memory["why"]  # 140 MB beyond eager's loading overhead: 100 mapped from files, 40 copies
    assert "100 MB file-backed (the artifact's files mapped into memory" in why and "; 40 MB anonymous" in why
    assert dequant.memory["why"][0].startswith("its graph needs more while running: predicted activation peak "
                                               "40.0 MB at gelu (eager: 18.0 MB)")
    assert len(dequant.memory["why"]) == 1  # its run grows by what the analysis predicts: nothing else to say
    fused = _variant("int8 @ onnxruntime", model=142, load=100, run=42, weights=96, acts=40)
    explain_memory([eager, fused])  # the prediction models an eager run: not a reason for another runtime
    assert fused.memory["why"] == ["22 MB more than eager, neither loading nor running alone explains it "
                                   "(allocator or library state)"]
    report = BenchReport("m", 0.0, 1.0, {}, {"timing": {"warmup": 1, "rounds": 1}}, [v.to_json() for v in variants], [])
    md = "\n".join(report.memory_section())
    assert "## Memory (b32)" in md
    assert "| O2 @ onnxruntime | 215.0 | 200.0 | 15.0 | 96.0 | 18.0 | 114.0 | 101.0 |" in md
    assert "- O2 @ onnxruntime needs more than eager: loading holds 200 MB" in md


def test_no_measurement_no_section():
    v = Variant("eager", "baseline")
    v.memory = {"method": "unavailable", "reason": "no /proc"}
    explain_memory([v])
    assert BenchReport("m", 0.0, 1.0, {}, {}, [v.to_json()], []).memory_section() == []
