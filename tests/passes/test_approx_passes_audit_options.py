"""Audit of the approximate passes (s27), options: skip= patterns that match nothing, prune-embeddings'
keep / keep_file refusals and a head bias added first, quantize-int8-weights on ``x @ W``.

Tiny models captured with graphopt.capture; numerics against eager with the tolerance stated at each
check; the pass report says what was changed, declined and why."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import PassOptionError

N, SPECIAL, D = 50, 2, 16  # items 0..49 (0 = padding), rows 50, 51 special tokens


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _calib() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g),) for _ in range(4)]


# ------------------------------------------------ finding 8: skip= patterns that match nothing
SKIP_PASSES = ["cast{dtype=bf16 skip=%s}", "quantize-int8{calibration=minmax max_drop=0 skip=%s}",
               "quantize-int8-dynamic{skip=%s}", "quantize-int8-weights{skip=%s}"]


@pytest.mark.parametrize("pipe", SKIP_PASSES)
def test_skip_pattern_matching_nothing_is_noted(pipe):
    prog = graphopt.capture(_mlp(), (torch.randn(2, 16),))
    # ``0`` is the user's named_modules() name; graphopt's module path is ``model.0``
    _, rep = graphopt.optimize(prog, pipe % "0,typo*", calibration_data=_calib())
    r = rep.passes[-1]
    notes = [n for n in r.notes if n.startswith("skip=")]
    assert notes == ["skip=0,typo* matched no module path or node name, so nothing was kept float for it (did you "
                     "mean model.0?); write module paths as graphopt names them (here: model.0, model.1, model.2)"]
    assert not any("matched skip" in d for d in r.declined)


@pytest.mark.parametrize("pipe", SKIP_PASSES)
def test_skip_pattern_that_matches_keeps_its_layer_float_without_a_note(pipe):
    prog = graphopt.capture(_mlp(), (torch.randn(2, 16),))
    _, rep = graphopt.optimize(prog, pipe % "model.0", calibration_data=_calib())
    r = rep.passes[-1]
    assert not any(n.startswith("skip=") for n in r.notes)
    assert any("model.0" in d and "matched skip" in d for d in r.declined), r.declined


def test_unmatched_skip_reports_only_the_patterns_that_match_nothing():
    from graphopt.ir.fx import skip_note, unmatched_skip

    gm = graphopt.capture(_mlp(), (torch.randn(2, 16),)).gm
    assert unmatched_skip(gm, ["model.*", "linear", "0", "*.2"]) == ["0"]  # paths and node names both count
    assert skip_note(gm, ["model.*"]) == [] and skip_note(gm, []) == []


# ------------------------------------------------ finding 9: prune-embeddings option refusals
class TiedRec(nn.Module):
    """Item embedding tied to the scoring head ``h @ W[:N].t()``, with a bias added after or first."""

    def __init__(self, bias_first=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(N + SPECIAL, D, padding_idx=0)
        self.lin = nn.Linear(D, D)
        self.b = nn.Parameter(torch.randn(N))
        self.bias_first = bias_first

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids).mean(1)))
        scores = h @ self.emb.weight[:N].t()
        return self.b + scores if self.bias_first else scores + self.b


@pytest.fixture(scope="module")
def rec_program():
    return graphopt.capture(TiedRec().eval(), (torch.randint(0, N, (3, 6)),))


@pytest.mark.parametrize("keep", ["5,30-20", "30-20"])
def test_prune_embeddings_refuses_a_reversed_range(rec_program, keep):
    with pytest.raises(PassOptionError, match=r"option 'keep': range '30-20' is reversed \(empty\); write it "
                                              r"low-high, 20-30$"):
        graphopt.optimize(rec_program, f"prune-embeddings{{keep={keep}}}")


@pytest.mark.parametrize("count", ["nan", "inf", "-inf"])
def test_prune_embeddings_refuses_a_non_finite_keep_file_count(rec_program, tmp_path, count):
    path = tmp_path / "keep.txt"
    path.write_text(f"1 {count}\n2 3\n")
    with pytest.raises(PassOptionError, match=rf"option 'keep_file': .*keep.txt:1: count '{count}' is not a finite "
                                              r"number; give a count \(or just the id\) on each line$"):
        graphopt.optimize(rec_program, f"prune-embeddings{{keep_file={path} min_count=1}}")


def test_prune_embeddings_accepts_ranges_and_counts(rec_program, tmp_path):
    _, rep = graphopt.optimize(rec_program, "prune-embeddings{keep=5,20-30}")  # near miss: low-high
    assert rep.passes[-1].details[0]["items_dropped"] == N - 1 - 12  # 5, 20..30, and the padding row 0
    path = tmp_path / "keep.txt"
    path.write_text("1 0.5\n2 3\n# comment\n4\n")
    _, rep = graphopt.optimize(rec_program, f"prune-embeddings{{keep_file={path} min_count=1}}")
    assert rep.passes[-1].details[0]["items_dropped"] == N - 3  # 2, 4 and the padding row


# ------------------------------------------------ finding 10: a head bias added first
@pytest.mark.parametrize("bias_first", [True, False])
def test_prune_embeddings_dropped_items_score_exactly_fill(bias_first, tmp_path):
    model = TiedRec(bias_first=bias_first).eval()
    prog = graphopt.capture(model, (torch.randint(0, N, (3, 6)),))
    pruned, rep = graphopt.optimize(prog, "prune-embeddings{keep=1-19}")
    assert rep.passes[-1].details[0]["items_dropped"] == N - 20
    # the full-width head bias is gone: pruned with the table, on either side of the add
    assert not any(n.op == "get_attr" and n.target == "b" for n in pruned.gm.graph.nodes)
    kept, dropped = list(range(0, 20)), list(range(20, N))
    ids = [torch.randint(1, 20, (4, 5)), torch.randint(0, N + SPECIAL, (2, 7))]  # kept ids; every id
    graphopt.lower(pruned, "onnxruntime", str(tmp_path / "ort")) if _has_ort() else None
    runners = [("program", pruned)] + ([("onnxruntime", graphopt.load(str(tmp_path / "ort")))] if _has_ort() else [])
    for where, run in runners:
        out = _first(run(ids[0]))
        ref = model(ids[0]).detach()
        torch.testing.assert_close(out[:, kept], ref[:, kept], atol=1e-5, rtol=1e-5, msg=where)  # kept: as eager
        assert bool((out[:, dropped] == -65504.0).all()), (where, out[0, dropped[:4]])  # dropped: fill, no bias
        assert _first(run(ids[1])).shape == (2, N)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _has_ort() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------ finding 12: quantize-int8-weights on x @ W
class MatmulByParam(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.W = nn.Parameter(torch.randn(16, 8) * 0.3)

    def forward(self, x):
        h = x @ self.W  # a parameter: exactly a linear
        return h, h @ h.t()  # two computed operands: stays float (near miss)


def test_quantize_int8_weights_quantizes_x_at_w():
    model = MatmulByParam().eval()
    prog = graphopt.capture(model, (torch.randn(4, 16),))
    q, rep = graphopt.optimize(prog, "quantize-int8-weights")
    r = rep.passes[-1]
    assert r.stats == {"linear": 1, "as-linear:matmul": 1}
    assert len(r.declined) == 1 and r.declined[0].endswith("of computed operands stays float"), r.declined
    assert [tuple(t.shape) for t in q.parameter_tensors().values() if t.dtype == torch.int8] == [(8, 16)]
    x = (torch.randn(6, 16),)
    h, hh = q(*x)
    h_ref, hh_ref = model(*x)
    # per-row int8 weights: each within max|row| / 254, so h within the pass's tolerance 0.05 (atol = rtol)
    torch.testing.assert_close(h, h_ref.detach(), atol=0.05, rtol=0.05)
    assert float((hh - hh_ref).abs().max()) <= 0.05 * float(hh_ref.abs().max())
