"""PNG plots of a BenchReport (matplotlib, Agg backend; imported only when saving)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from graphopt.metrics import FIDELITY_BAR

if TYPE_CHECKING:
    from graphopt.bench.report import BenchReport

__all__ = ["plot_latency", "plot_tradeoff"]

_KIND_COLOURS = {"baseline": "#555555", "graphopt": "#1f77b4", "peer": "#ff7f0e"}


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(report: BenchReport, path: Path) -> Path:
    """p50 latency (bar) with p90 whisker, one panel per shape, on a linear axis from 0
    (bar lengths compare honestly)."""
    plt = _pyplot()
    shapes = report.shapes or ["-"]
    names = [v["name"] for v in report.variants]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 0.35 * len(names) + 1.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        by_name = {r["variant"]: r for r in report.rows(shape)}
        ys, p50s, errs, colours, labels = [], [], [], [], []
        for i, name in enumerate(names):
            r = by_name.get(name, {})
            lat = r.get("latency") or {}
            ys.append(i)
            labels.append(name)
            if r.get("status") == "ok" and lat:
                p50s.append(lat["p50_ms"])
                errs.append(max(0.0, lat["p90_ms"] - lat["p50_ms"]))
            else:
                p50s.append(0.0)
                errs.append(0.0)
            colours.append(_KIND_COLOURS.get(report.variant(name)["kind"], "#999999"))
        ax.barh(ys, p50s, xerr=[[0.0] * len(errs), errs], color=colours, alpha=0.85, error_kw={"elinewidth": 0.8})
        for y, p, r in zip(ys, p50s, (by_name.get(n, {}) for n in names)):
            if p == 0.0:
                ax.text(0.01, y, r.get("status", "n/a"), va="center", fontsize=7, color="#aa0000", transform=ax.get_yaxis_transform())
        ax.set_yticks(ys, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(left=0)
        ax.set_xlabel("latency ms (p50, whisker to p90)")
        ax.set_title(f"{report.model} · {shape}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fidelity_line(label: str) -> float | None:
    """Where graphopt.metrics.FIDELITY_BAR sits on the trade-off's accuracy axis."""
    if "%" in label:
        return -100.0 * FIDELITY_BAR.max_rel_drop
    if label.startswith("top-k"):
        return FIDELITY_BAR.min_topk_overlap
    return None


def plot_tradeoff(report: BenchReport, path: Path) -> Path:
    """Speedup vs accuracy per shape; the Pareto front is drawn and its points ringed."""
    plt = _pyplot()
    shapes = report.shapes or ["-"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        points, label = report.tradeoff(shape)
        front = set(report.pareto(shape))
        offsets = [(4, 4), (4, -10), (4, 12), (4, -18), (4, 20), (4, -26)]  # stagger labels of close points
        for i, (name, x, y) in enumerate(sorted(points, key=lambda p: (p[2], p[1]))):
            kind = report.variant(name)["kind"]
            ax.scatter([x], [y], color=_KIND_COLOURS.get(kind, "#999999"), s=36, zorder=3,
                       edgecolors="black" if name in front else "none", linewidths=1.2)
            ax.annotate(name, (x, y), fontsize=6, xytext=offsets[i % len(offsets)], textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.3, "color": "#999999"})
        fp = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
        if fp:
            ax.plot([p[1] for p in fp], [p[2] for p in fp], "--", color="#2ca02c", zorder=2, label="Pareto front (ringed)")
        for kind, colour in _KIND_COLOURS.items():
            ax.scatter([], [], color=colour, s=36, label=kind)
        ax.legend(fontsize=7, loc="lower left")
        if points and all(p[1] > 0 for p in points):
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                axis(FuncFormatter(lambda v, _pos: f"{v:g}x" if f"{v:g}"[0] in "1235" else ""))
        ax.axvline(1.0, color="#888888", lw=0.6)
        ax.set_xlabel("speedup vs eager (x, paired rounds)")
        ax.set_ylabel(label or "accuracy")
        ax.set_title(f"{report.model} · {shape}", fontsize=9)
        bar = _fidelity_line(label)
        if bar is not None:
            ax.axhline(bar, color="#d62728", lw=0.8, ls=":", label="fidelity bar")
        if points:  # zoom on the points (and the bar): a 0..1 axis hides a 1% difference
            ys = [p[2] for p in points] + ([bar] if bar is not None else [])
            lo, hi = min(ys), max(ys)
            pad = max((hi - lo) * 0.15, 0.1 if "%" in label else 0.002)
            ax.set_ylim(lo - pad, hi + pad)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
