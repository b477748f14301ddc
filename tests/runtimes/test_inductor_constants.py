"""inductor: a CPU package's constants moved onto 64-byte boundaries when it loads
(runtimes/inductor_constants.py). AOTInductor copies them into one malloc'd block, 16 bytes
off a cache line; the runner moves them into torch-allocated memory and releases the old pages.
What must hold: the model reads the moved copies (the old pages read as zeros once released, so
a model still reading them would not reproduce the loader's outputs), its outputs are bit for
bit the package loader's at two shapes, packed oneDNN weights and constants that share an FQN
(a quantized model's ``x_scale``) included, the old copies are given back, and turning it off or
a failure leaves the loader's placement with the reason. (Off, the same container runner reports
how many constants sit off a cache line and moves none.)"""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.runtime import available_runtimes, lower
from tests._lowered_once import lowered_once

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _inductor():
    if not available_runtimes()["inductor"].available:
        pytest.skip(available_runtimes()["inductor"].reason)


def _outputs(path, feeds, **options):
    with graphopt.load(path, **options) as runner:
        return [runner(*f)[0] for f in feeds], runner.constant_placement


def _loader_outputs(artifact, feeds):
    """What torch's own package loader computes (its constants wherever malloc put them)."""
    model = torch._inductor.aoti_load_package(str(artifact.path / artifact.manifest["backend"]["entry"]))
    with torch.inference_mode():
        return [model(*f)[0] for f in feeds]


@pytest.mark.parametrize("pipeline", ["O2", "O2,cast{dtype=bf16}"])
def test_a_block_glibc_maps_is_never_aligned_and_every_weight_moves(tmp_path, pipeline):
    """An 8192 x 4096 weight (128 MB in float32, 64 MB in bf16, packed for oneDNN): glibc maps a
    block that size by itself and returns it 16 bytes past the page, so as loaded every constant
    is off a cache line (above glibc's largest dynamic mmap threshold, 32 MB: a 4096 x 4096 bf16
    block of exactly 32 MB came from the heap, aligned, once earlier tests had raised the threshold). All of them move (nothing shares an FQN here; in bf16 oneDNN's packed
    weights too), the old copies' pages are released (all but the partial pages at their ends),
    every constant the model reads starts on a 64-byte boundary, and the outputs are the
    loader's bit for bit at batch 1 and 5 (and the Program's within float32 / bf16 tolerance)."""
    from graphopt.runtimes.inductor_constants import ALIGNMENT, AlignedPackage

    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(4096, 8192), torch.nn.ReLU(), torch.nn.Linear(8192, 16)).eval()
    prog, _ = graphopt.optimize(graphopt.capture(wide, torch.randn(4, 4096), name="wide"), pipeline,
                                verify_each=False)
    artifact = lower(prog, "inductor", tmp_path / "wide", device="cpu", max_autotune=False, threads=2)
    feeds = [(torch.randn(b, 4096, generator=torch.Generator().manual_seed(b)),) for b in (1, 5)]
    tol = 1e-4 if pipeline == "O2" else 2e-2
    aligned, (moved,) = _outputs(artifact.path, feeds)
    left, (kept,) = _outputs(artifact.path, feeds, align_constants=False)
    assert moved["misaligned"] == moved["moved"] >= 4 and moved["kept"] == 0, moved  # 2 weights, 2 biases
    assert moved["moved_bytes"] >= 4096 * 4096 * 2, moved
    assert moved["moved_packed"] > 0 or "bf16" not in pipeline, moved  # bf16: oneDNN's packed weights moved
    assert moved["released_bytes"] >= moved["moved_bytes"] - 2 * 4096 * moved["moved"], moved
    assert kept["moved"] == 0 and kept["misaligned"] == moved["misaligned"], kept  # off: where AOTInductor put them
    for got, off, want, f in zip(aligned, left, _loader_outputs(artifact, feeds), feeds):
        assert torch.equal(got, want) and torch.equal(off, want)
        torch.testing.assert_close(got, prog(*f)[0], atol=tol, rtol=tol)
    package = AlignedPackage(artifact.path / artifact.manifest["backend"]["entry"])
    try:
        assert package.misaligned() == [] and package.placement["moved"] == moved["moved"]
        assert ALIGNMENT == 64
    finally:
        package.close()


@pytest.mark.parametrize("pipeline", ["O2,cast{dtype=bf16}", "O2,quantize-int8{mixed=bf16}"])
def test_packed_and_shared_fqn_constants_keep_the_loaders_outputs(program, tmp_path, pipeline):
    """bert4rec:tiny in bf16 (oneDNN's packed weights: opaque tensors, moved by clone) and in
    int8-mixed-bf16 (per-layer ``x_scale`` / ``x_zp`` share one FQN: those stay where they are):
    bit for bit the loader's outputs at two shapes, and every constant that could move now on a
    64-byte boundary."""
    from graphopt.runtimes.inductor_constants import AlignedPackage

    from graphopt.passlib.calibration import default_calibration

    base = program("bert4rec:tiny")
    calib = {"calibration_data": default_calibration(base)} if "quantize" in pipeline else {}
    prog, _ = graphopt.optimize(base, pipeline, verify_each=False, **calib)
    artifact = lower(prog, "inductor", tmp_path / "pkg", device="cpu", max_autotune=False, threads=2)
    feeds = [base.sample_inputs(batch=b, seq=s, seed=3) for b, s in ((1, 8), (3, 12))]
    aligned, (placement,) = _outputs(artifact.path, feeds)
    assert isinstance(placement, dict), placement
    if "quantize" in pipeline:
        assert placement["kept"] > 0, placement  # the shared-FQN scales and zero points
    for got, want in zip(aligned, _loader_outputs(artifact, feeds)):
        assert torch.equal(got, want)
    package = AlignedPackage(artifact.path / artifact.manifest["backend"]["entry"])
    try:
        assert package.misaligned() == []
    finally:
        package.close()


def test_a_failure_to_align_loads_the_package_as_the_loader_places_it(program, tmp_path_factory, monkeypatch):
    """Aligning is a speed-up, not a requirement: when it fails the runner loads the package
    with the loader, says why in ``constant_placement``, and its outputs are unchanged. (Any
    package will do: this one is the conformance suite's bert4rec:tiny, lowered once per session.)"""
    import graphopt.runtimes.inductor_constants as constants

    prog = program("bert4rec:tiny")
    artifact = lowered_once(tmp_path_factory, prog, "inductor", device="cpu")
    feeds = [prog.sample_inputs(batch=2, seq=8, seed=1)]
    want, _ = _outputs(artifact.path, feeds)

    def refuse(self, package, move=True):
        raise ValueError("no container runner here")

    monkeypatch.setattr(constants.AlignedPackage, "__init__", refuse)
    got, placement = _outputs(artifact.path, feeds)
    assert placement == ["left as loaded: aligning its constants failed (ValueError: no container runner here)"]
    assert torch.equal(got[0], want[0])
