"""``graphopt inspect MODEL --memory``: the memory analysis as tables, JSON and a plot.

Weights by kind and dtype; the activation peak as an expression in the
dynamic dims; per (batch, seq): weights, activation peak, inputs, total and
the node at the peak; the largest tensors live at the peak of the largest
shape; with ``--plot FILE``, peak memory against batch size (one line per
sequence length), evaluated from the expression.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphopt.bench.shapes import unnamed_dims
from graphopt.errors import ArtifactError, PipelineParseError, first_line
from graphopt.outputs import usual_mode
from graphopt.runtime.contract import size_outside
from graphopt.transform.memory import MemoryAnalysis, format_bytes

#: bytes a 64-bit process can address: a predicted run past it is no prediction
_ADDRESSABLE = 2**64

__all__ = ["run_memory", "check_plot", "shapes_for", "plot_peak", "render"]


def shapes_for(analysis: MemoryAnalysis, batches: list[int] | None, seqs: list[int] | None,
               ranges: Mapping[str, Mapping[str, int | None]] | None = None, unnamed: str | None = None,
               ) -> tuple[list[dict[str, int | None]], list[str]]:
    """(batch, seq) points to evaluate, and notes on sizes the Program does not have;
    a size outside the range torch.export proved for its dim (``ranges``, from
    :func:`graphopt.runtime.contract.dim_ranges`) is refused: the Program cannot run it."""
    outside = size_outside(dict(ranges or {}), analysis.program,
                           (("--batch-sizes", "batch", batches), ("--seq-lens", "seq", seqs)))
    if outside:
        raise ArtifactError(outside)
    notes = []
    has_batch, has_seq = "batch" in analysis.symbols, "seq" in analysis.symbols
    if batches and not has_batch:
        notes.append(f"{analysis.program} has no dynamic 'batch' dim; --batch-sizes ignored")
    if seqs and not has_seq:
        notes.append(f"--seq-lens ignored: {unnamed}" if unnamed else
                     f"{analysis.program} has no dynamic 'seq' dim; --seq-lens ignored")
    b_values: list[int | None] = list(batches) if batches and has_batch else [None]
    s_values: list[int | None] = list(seqs) if seqs and has_seq else [None]
    shapes = [{"batch": b, "seq": s} for s in s_values for b in b_values]
    for shape in shapes:  # an unbounded dim (batch) still stops where no machine could hold the run
        total = analysis.at(**shape).total
        if total >= _ADDRESSABLE:
            at = ", ".join(f"{k} {v}" for k, v in shape.items() if v is not None)
            raise ArtifactError(f"{analysis.program} would need {format_bytes(total)} at {at}, beyond a 64-bit "
                                "address space (16 EiB): no machine runs it; pick smaller --batch-sizes/--seq-lens")
    return shapes, notes


def _table(title: str, header: list[str], rows: list[list[str]]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))  # shapes like [batch, seq] are not markup
    return table


def render(analysis: MemoryAnalysis, shapes: list[dict[str, int | None]], notes: list[str], console: Any) -> None:
    """The rich tables of ``graphopt inspect --memory``."""
    rows = [[r["kind"], r["dtype"], str(r["tensors"]), format_bytes(r["bytes"])] for r in analysis.weights_by_kind()]
    rows.append(["total", "", str(len(analysis.weights)), format_bytes(analysis.weight_bytes)])
    console.print(_table(f"{analysis.program} · weights", ["kind", "dtype", "tensors", "bytes"], rows))
    labels = ", ".join(f"{k} (example {v})" for k, v in analysis.defaults.items()) or "none (static shapes)"
    console.print(f"dynamic dims: {labels}", highlight=False)
    console.print(f"activation peak (bytes) = {analysis.peak_expr}", highlight=False)
    console.print(f"inputs (bytes, the caller's) = {analysis.expr_of('input')}", highlight=False)
    estimates = [analysis.at(**s) for s in shapes]
    rows = [
        [str(e.sizes.get("batch", "-")), str(e.sizes.get("seq", "-")), format_bytes(e.weights),
         format_bytes(e.activations), format_bytes(e.inputs), format_bytes(e.total), e.peak_node,
         e.peak_op.removeprefix("aten.").removesuffix(".default")]
        for e in estimates
    ]
    header = ["batch", "seq", "weights", "activation peak", "inputs", "weights + peak", "peak at", "op"]
    console.print(_table("memory per shape (eager run)", header, rows))
    top = max(estimates, key=lambda e: e.activations)
    rows = [[t["node"], t["op"], t["shape"], t["dtype"], format_bytes(t["bytes"])] for t in top.largest]
    sizes = ", ".join(f"{k}={v}" for k, v in top.sizes.items())
    console.print(_table(f"largest tensors live at the peak ({sizes})", ["made by", "op", "shape", "dtype", "bytes"], rows))
    for note in [*notes, *analysis.notes]:
        console.print(f"note: {note}", highlight=False)


def plot_peak(analysis: MemoryAnalysis, batches: list[int], seqs: list[int | None], path: Path) -> Path:
    """Weights + activation peak against batch size (log axis), one line per seq length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(batches + [1])
    grid = sorted({*batches, *(int(round(top ** (i / 40))) for i in range(41))})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for seq in seqs:
        totals = [analysis.at(batch=b, seq=seq).total / 2**20 for b in grid]
        label = f"seq {seq}" if seq is not None else "weights + activation peak"
        (line,) = ax.plot(grid, totals, label=label)
        ax.scatter(batches, [analysis.at(batch=b, seq=seq).total / 2**20 for b in batches], s=14, color=line.get_color())
    ax.axhline(analysis.weight_bytes / 2**20, color="#777777", linestyle="--", linewidth=0.8, label="weights")
    ax.set_xscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("MiB (weights + activation peak)")
    ax.set_title(f"{analysis.program}: predicted peak memory of an eager run", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        usual_mode(tmp)
        fig.savefig(tmp, dpi=110, format=(path.suffix.lstrip(".") or "png"))
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_plot(args: argparse.Namespace) -> None:
    """Refuse a ``--plot`` path that is no image file name, exists (without ``--force``) or has no folder."""
    if args.plot:
        plot = Path(args.plot)
        if plot.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise ArtifactError(f"--plot {plot}: name a .png (or .svg, .pdf) file")
        if plot.is_dir():
            raise ArtifactError(f"--plot {plot} is a folder; name a .png file")
        if plot.exists() and not args.force:
            raise ArtifactError(f"{plot} exists; pass --force to overwrite it")
        if not plot.parent.is_dir():
            raise ArtifactError(f"no folder {plot.parent} for the plot; create it first")
        try:  # before the model loads and the analysis runs, not after
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise PipelineParseError(f"--plot needs matplotlib: pip install 'graphopt[plots]' "
                                     f"({first_line(e, with_type=False, limit=80)})") from None


def run_memory(program: Any, args: argparse.Namespace) -> int:
    from graphopt.runtime.contract import dim_ranges
    from graphopt.transform.analysis import AnalysisManager

    plot = Path(args.plot) if args.plot else None
    check_plot(args)
    analysis = AnalysisManager().get("memory", program)
    shapes, notes = shapes_for(analysis, args.batch_sizes, args.seq_lens, dim_ranges(program),
                               unnamed_dims(program))
    if args.json:
        data = analysis.to_json(shapes)
        data["notes"] = notes + data["notes"]
        print(json.dumps(data, indent=2, default=str))
    else:
        from rich.console import Console

        render(analysis, shapes, notes, Console() if sys.stdout.isatty() else Console(width=160))
    if plot is not None:
        batches = [b for b in (args.batch_sizes or [1, 8, 32, 128, 256])]
        seqs = list(dict.fromkeys(s["seq"] for s in shapes))
        plot_peak(analysis, batches if "batch" in analysis.symbols else [1], seqs, plot)
        if not args.json:
            print(f"plot: {plot}")
    return 0
