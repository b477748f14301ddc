"""Observers: ranges per method on known distributions, histogram growth, agreement metrics."""

from __future__ import annotations

import pytest
import torch

from graphopt.passlib.calibration import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    agreement,
    default_calibration,
    make_observer,
    observe,
    read_as,
)


def _skewed(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Mostly small values, a long thin tail (like post-GELU activations with outliers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).abs()
    x[:20] = 40.0 + torch.rand(20, generator=g) * 10
    return x


def test_minmax_is_observed_range():
    obs = MinMaxObserver()
    obs.update(torch.tensor([-1.0, 2.0]))
    obs.update(torch.tensor([3.5, 0.0]))
    assert obs.range() == (-1.0, 3.5)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_clipping_methods_differ_from_minmax_on_skewed_data(method):
    x = _skewed()
    mm, clip = make_observer("minmax"), make_observer(method, percentile=99.9)
    for chunk in x.chunk(4):
        mm.update(chunk)
        clip.update(chunk)
    lo, hi = clip.range()
    assert lo == mm.range()[0]
    # the tail (> 40) holds 0.01% of the values: every method clips well below it
    assert 2.0 < hi < 0.5 * mm.range()[1], (method, hi)


def test_mse_clips_a_heavy_tail_but_keeps_rare_huge_outliers():
    g = torch.Generator().manual_seed(1)
    laplace = torch.empty(200_000).exponential_(1.0, generator=g) * torch.sign(torch.randn(200_000, generator=g))
    mm, mse = make_observer("minmax"), make_observer("mse")
    mm.update(laplace)
    mse.update(laplace)
    assert mse.range()[1] < 0.9 * mm.range()[1]
    # 20 values at ~45 cost more squared error clipped than the rounding they save
    x = _skewed()
    mm, mse = make_observer("minmax"), make_observer("mse")
    mm.update(x)
    mse.update(x)
    assert mse.range()[1] > 0.8 * mm.range()[1]


@pytest.mark.parametrize("method", ["minmax", "entropy", "mse", "percentile"])
def test_one_histogram_read_as_each_method_equals_that_methods_observer(method):
    x = _skewed(seed=3) - 0.5  # both signs, a long tail
    shared, own = HistogramObserver(2048), make_observer(method, percentile=99.9, bins=2048)
    for chunk in x.chunk(5):
        shared.update(chunk)
        own.update(chunk)
    assert read_as(shared, method, percentile=99.9).range() == own.range()
    if method != "minmax":  # and it is a clipping method's range, not the observed one
        assert read_as(shared, method, percentile=99.9).range()[1] < float(x.max())
    with pytest.raises(ValueError, match="bins"):
        read_as(HistogramObserver(512), "entropy")


def test_entropy_needs_fine_histogram():
    with pytest.raises(ValueError, match="2048"):
        EntropyObserver(bins=128)
    assert make_observer("entropy", bins=128).bins == 2048


def test_histogram_regrow_keeps_counts_and_range():
    obs = HistogramObserver(bins=256)
    obs.update(torch.linspace(-1, 1, 1000))
    obs.update(torch.linspace(-4, 4, 1000))
    assert obs.top == pytest.approx(4.0)
    assert obs.hist.sum() == pytest.approx(2000)
    # the first batch's mass lies in the bottom quarter of the grown histogram
    assert obs.hist[: 256 // 4 + 1].sum() >= 1000


def test_observer_without_values_says_what_to_do():
    with pytest.raises(ValueError, match="calibration batches"):
        MinMaxObserver().range()


def test_observe_feeds_named_nodes():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    relu = next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    obs = observe(gm, [(torch.randn(5, 4),), (torch.randn(7, 4),)], [relu], "minmax")
    lo, hi = obs[relu].range()
    assert lo == 0.0 and hi > 0.0 and obs[relu].count == 12 * 3


def test_agreement_metrics():
    ref = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for metric in ("topk_overlap", "cosine", "ndcg"):
        assert agreement(metric, [ref], [ref]) == pytest.approx(1.0)
        assert agreement(metric, [-ref], [ref]) < 0.5
    # a (batch, 1) score column ranks the batch's candidates
    col = torch.arange(30.0).reshape(30, 1)
    assert agreement("topk_overlap", [col], [col]) == 1.0
    assert agreement("topk_overlap", [-col], [col]) == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        agreement("auc", [ref], [ref])


def test_default_calibration_is_seeded_rows_at_the_default_batch(program):
    p = program("bert4rec:tiny")
    batches = default_calibration(p)
    assert len(batches) == 16 and all(b[0].shape[0] == 32 for b in batches)  # 16 x 32 rows
    again = default_calibration(p)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # deterministic
    assert not torch.equal(batches[0][0], batches[1][0])  # distinct seeds
    example = p.sample_inputs(batch=32, seed=0)
    assert not any(torch.equal(b[0], example[0]) for b in batches)  # apart from the seed-0 inputs
    assert default_calibration(p, 2, None)[0][0].shape[0] == p.inputs[0].shape[0]  # None: the captured batch
