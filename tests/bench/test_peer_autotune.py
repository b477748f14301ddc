"""The torch.compile max-autotune peer: really compiled with mode="max-autotune" under bf16
autocast, and as close to eager as bf16 allows at two batch sizes (a recompile)."""

from __future__ import annotations

import pytest
import torch
from graphopt.passes.cast import TOLERANCE

import graphopt
from graphopt.bench.peers import PEERS, build_peers

pytestmark = pytest.mark.slow


class _Scorer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.net(x),)


def test_max_autotune_peer_runs_compiled_and_matches_eager_in_bf16(tmp_path, monkeypatch):
    from graphopt.hardware import has_bf16_kernels

    if not has_bf16_kernels():  # there oneDNN runs bf16 as reference code: a 22 s autotune of reference kernels
        pytest.skip("the bf16 peers are left out of the bench on a CPU without bf16 GEMM kernels "
                    "(graphopt.bench.peers.default_peers); this one is tested where it runs")
    torch.manual_seed(0)
    model = _Scorer().eval()
    program = graphopt.capture(model, torch.randn(4, 128), name="scorer")
    assert "torch.compile-bf16-max-autotune" in PEERS
    modes = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: modes.append(kw.get("mode")) or real_compile(m, **kw))
    (peer,) = build_peers(model, program, tmp_path, peers=["torch.compile-bf16-max-autotune"])
    assert peer.name == "peer: torch.compile-bf16-max-autotune" and "max-autotune" in peer.pipeline
    assert modes == ["max-autotune"]  # the real torch.compile, asked for max-autotune
    for batch in (1, 5):
        x = torch.randn(batch, 128, generator=torch.Generator().manual_seed(batch))
        (got,), (want,) = peer.fn(x), model(x)
        assert got.dtype == torch.bfloat16  # autocast ran the GEMMs in bf16
        torch.testing.assert_close(got.float(), want, atol=TOLERANCE["bf16"], rtol=TOLERANCE["bf16"])
