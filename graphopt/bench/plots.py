"""PNG plots of a BenchReport (matplotlib, Agg backend; imported only when saving).

``latency.png``: p50 bars with a p90 whisker on a linear axis from 0, each bar
labelled with its p50, speedup over eager and ✗ below the fidelity bar. ``tradeoff.png``: speedup vs
accuracy (NDCG@10 change vs eager in %, with eval data; else top-10 overlap with
eager), zoomed to the data, the fidelity bar drawn and the region below it
shaded. Points carry numbers, not names (names of close points collide): one
key beside the panels maps each number to its variant, the same in every panel.
Numbers are placed by a small repel: the first of eight offsets around the
point whose box clears every number and point placed before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.fidelity_bar import FIDELITY_BAR

if TYPE_CHECKING:
    from graphopt.bench.report import BenchReport

__all__ = ["plot_latency", "plot_tradeoff", "place_labels"]

_KIND_COLOURS = {"baseline": "#555555", "graphopt": "#1f77b4", "peer": "#ff7f0e"}
#: label offsets tried in turn (points): right, above, left, below, then the diagonals
_OFFSETS = ((6, -3), (-3, 6), (-12, -3), (-3, -12), (6, 6), (-12, 6), (-12, -12), (6, -12), (14, -3), (-20, -3))


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(report: BenchReport, path: Path) -> Path:
    """p50 latency (bar) with p90 whisker, one panel per shape, on a linear axis from 0
    (bar lengths compare honestly), each bar labelled "p50 ms · speedup" (and ✗ where
    the variant is below the fidelity bar)."""
    plt = _pyplot()
    shapes = report.shapes or ["-"]
    names = [v["name"] for v in report.variants]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.0 * len(shapes), 0.36 * len(names) + 1.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        by_name = {r["variant"]: r for r in report.rows(shape)}
        p50s, errs, colours = [], [], []
        for name in names:
            r = by_name.get(name, {})
            lat = r.get("latency") or {}
            ok = r.get("status") == "ok" and lat
            p50s.append(lat["p50_ms"] if ok else 0.0)
            errs.append(max(0.0, lat.get("p90_ms", lat["p50_ms"]) - lat["p50_ms"]) if ok else 0.0)
            colours.append(_KIND_COLOURS.get(report.variant(name)["kind"], "#999999"))
        ys = list(range(len(names)))
        ax.barh(ys, p50s, xerr=[[0.0] * len(errs), errs], color=colours, alpha=0.85, error_kw={"elinewidth": 0.8})
        top = max(p + e for p, e in zip(p50s, errs)) if any(p50s) else 1.0
        for y, p, e, name in zip(ys, p50s, errs, names):
            r = by_name.get(name, {})
            if p == 0.0:
                ax.text(0.01, y, r.get("status", "n/a"), va="center", fontsize=7, color="#aa0000",
                        transform=ax.get_yaxis_transform())
                continue
            speed = r.get("speedup", {}).get("speedup")
            text = f"{p:,.{2 if p < 100 else 0}f} ms" + (f" · {speed:.2f}x" if speed and name != "eager" else "")
            if r.get("accuracy") and not report.acceptable(r):
                text += " · ✗ below the fidelity bar"
            ax.text(p + e + 0.01 * top, y, text, va="center", fontsize=7)
        ax.set_yticks(ys, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.45)  # room for the labels
        ax.set_xlabel("latency ms (p50, whisker to p90); label: p50 · speedup vs eager")
        ax.set_title(f"{report.model} · {shape}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fidelity_line(label: str) -> float | None:
    """Where graphopt.fidelity_bar.FIDELITY_BAR sits on the trade-off's accuracy axis."""
    if "%" in label:
        return -100.0 * FIDELITY_BAR.max_rel_drop
    if label.startswith("top-k"):
        return FIDELITY_BAR.min_topk_overlap
    if label.startswith("cosine"):
        from graphopt.bench.report import MIN_COSINE

        return MIN_COSINE
    return None


def place_labels(points: list[tuple[float, float]], size: tuple[float, float]) -> list[tuple[float, float]]:
    """An offset (points) per point for a label of ``size`` (w, h in points) so that
    no two labels and no label and point overlap, where one of the offsets allows;
    ``points`` are marker positions in points. Greedy, in the order given."""
    w, h = size
    boxes: list[tuple[float, float, float, float]] = [(x - 3, y - 3, x + 3, y + 3) for x, y in points]  # markers
    chosen = []
    for i, (x, y) in enumerate(points):
        pick = _OFFSETS[0]
        for dx, dy in _OFFSETS:
            box = (x + dx, y + dy, x + dx + w, y + dy + h)
            others = boxes[:i] + boxes[i + 1:]  # every marker but its own, every label placed
            if not any(_overlap(box, b) for b in others):
                pick = (dx, dy)
                break
        chosen.append(pick)
        boxes.append((x + pick[0], y + pick[1], x + pick[0] + w, y + pick[1] + h))
    return chosen


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _axis_points(ax: Any, fig: Any, x: float, y: float) -> tuple[float, float]:
    """Data (x, y) in points from the axes' lower-left corner (valid once limits and layout are set)."""
    pos = ax.get_position()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    width, height = pos.width * fig.get_figwidth() * 72, pos.height * fig.get_figheight() * 72
    return (x - x0) / (x1 - x0) * width, (y - y0) / (y1 - y0) * height


def plot_tradeoff(report: BenchReport, path: Path) -> Path:
    """Speedup vs accuracy per shape: numbered points, one key; the Pareto front is
    drawn and its points ringed; the best graphopt variant and best peer (at the
    fidelity bar) are stars."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    shapes = report.shapes or ["-"]
    numbers = {v["name"]: i + 1 for i, v in enumerate(report.variants)}
    fig = plt.figure(figsize=(5.0 * len(shapes) + 2.8, 4.6))
    grid = fig.add_gridspec(1, len(shapes) + 1, width_ratios=[5.0] * len(shapes) + [2.8])
    panels = []
    for i, shape in enumerate(shapes):
        ax = fig.add_subplot(grid[0, i])
        points, label = report.tradeoff(shape)
        front = set(report.pareto(shape))
        stars = {report.best(shape), report.best(shape, kind="peer")} - {None}
        for name, x, y in points:
            kind = report.variant(name)["kind"]
            ax.scatter([x], [y], color=_KIND_COLOURS.get(kind, "#999999"), zorder=3,
                       marker="*" if name in stars else "o", s=130 if name in stars else 36,
                       edgecolors="black" if name in front else "none", linewidths=1.0)
        fp = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
        if len(fp) > 1:
            ax.plot([p[1] for p in fp], [p[2] for p in fp], "--", color="#2ca02c", lw=0.9, zorder=2)
        ax.axvline(1.0, color="#888888", lw=0.6)
        bar = _fidelity_line(label)
        xs = [p[1] for p in points] + [1.0]
        ys = [p[2] for p in points] + ([bar] if bar is not None else [])
        xpad = max((max(xs) - min(xs)) * 0.12, 0.1)
        ax.set_xlim(max(0.0, min(xs) - xpad), max(xs) + xpad)
        if points:  # zoom on the points and the bar: a 0..1 axis hides a 1% difference
            pad = max((max(ys) - min(ys)) * 0.15, 0.1 if "%" in label else 0.002)
            ax.set_ylim(min(ys) - pad, max(ys) + pad)
        if bar is not None:
            ax.axhline(bar, color="#d62728", lw=0.8, ls=":")
            ax.axhspan(ax.get_ylim()[0], bar, color="#d62728", alpha=0.06, lw=0)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
        ax.set_xlabel("speedup vs eager (paired rounds)")
        ax.set_ylabel(label or "accuracy")
        ax.set_title(f"{report.model} · {shape}", fontsize=9)
        ax.grid(alpha=0.3)
        panels.append((ax, points))
    key = fig.add_subplot(grid[0, -1])
    key.axis("off")
    lines = [(f"{numbers[v['name']]:>2}  {v['name']}" + ("" if v["status"] == "ok" else f" ({v['status']})"),
              _KIND_COLOURS.get(v["kind"], "#999999")) for v in report.variants]
    lines += [("", "black"), ("★ best at the fidelity bar", "black"), ("○ ringed: Pareto front", "black"),
              ("red dotted: fidelity bar, shaded below", "#d62728")]
    for j, (text, colour) in enumerate(lines):
        key.text(0.0, 1.0 - j * 0.055, text, color=colour, fontsize=7, va="top", transform=key.transAxes,
                 family="monospace")
    fig.tight_layout()
    for ax, points in panels:  # numbers last: their positions need the final layout
        at = [_axis_points(ax, fig, x, y) for _, x, y in points]
        offsets = place_labels(at, (11.0, 8.0))
        for (name, x, y), (dx, dy) in zip(points, offsets):
            ax.annotate(str(numbers[name]), (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                        color="#222222", zorder=4)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
