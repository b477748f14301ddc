"""Plots people can read: numbered points whose labels do not collide, a zoomed accuracy
axis with the fidelity bar, latency on a linear axis from 0."""

from __future__ import annotations

import itertools

import pytest

from graphopt.bench.plots import place_labels, plot_latency, plot_tradeoff
from tests.bench.test_bench import _report

pytest.importorskip("matplotlib")

LABEL = (11.0, 8.0)  # the size plot_tradeoff gives a number, in points


def _boxes(points, offsets, size=LABEL):
    return [(x + dx, y + dy, x + dx + size[0], y + dy + size[1]) for (x, y), (dx, dy) in zip(points, offsets)]


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_of_a_cluster_do_not_collide():
    cluster = [(100.0, 100.0), (103.0, 101.0), (101.0, 97.0), (98.0, 103.0), (104.0, 99.0), (100.0, 104.0)]
    boxes = _boxes(cluster, place_labels(cluster, LABEL))
    assert not any(_overlap(a, b) for a, b in itertools.combinations(boxes, 2))
    markers = [(x - 3, y - 3, x + 3, y + 3) for x, y in cluster]
    assert not any(_overlap(b, m) for b in boxes for m in markers)


def test_far_apart_points_keep_the_first_offset():
    """Near miss of the repel: nothing to avoid, so every label sits at the default offset."""
    spread = [(0.0, 0.0), (200.0, 0.0), (0.0, 200.0)]
    offsets = place_labels(spread, LABEL)
    assert len(set(offsets)) == 1


def test_plots_render_close_points(tmp_path):
    rep = _report([("eager", "baseline", 1.0, 1.0), ("a @ inductor", "graphopt", 3.00, 0.995),
                   ("b @ inductor", "graphopt", 3.01, 0.996), ("c @ eager", "graphopt", 2.99, 0.994),
                   ("peer: x", "peer", 3.02, 0.995), ("loose", "graphopt", 3.5, 0.97)])
    for plot, name in ((plot_tradeoff, "tradeoff.png"), (plot_latency, "latency.png")):
        path = plot(rep, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
