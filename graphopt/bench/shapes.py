"""The (batch, seq) points a bench measures, checked against what the Program can run."""

from __future__ import annotations

from collections.abc import Sequence

from graphopt.errors import PipelineParseError
from graphopt.ir.program import Program
from graphopt.runtime.contract import dim_ranges, size_outside

__all__ = ["bench_shapes"]


def bench_shapes(program: Program, batch_sizes: Sequence[int], seq_lens: Sequence[int], notes: list[str]) -> list[tuple[int, int | None]]:
    """The (batch, seq) points; a size outside the range torch.export proved for its dim is refused
    before any work (seq 600 past a 512-row position table failed after the other shapes had run)."""
    outside = size_outside(dim_ranges(program), program.name,
                           (("--batch-sizes", "batch", batch_sizes), ("--seq-lens", "seq", seq_lens)))
    if outside:
        raise PipelineParseError(outside)
    labels = program.dynamic_labels()
    batches = list(dict.fromkeys(int(b) for b in batch_sizes))
    if "batch" not in labels:
        static = program.inputs[0].shape[0]
        notes.append(f"batch is static in this Program ({static}); measured at batch {static} only")
        batches = [static]
    seqs: list[int | None] = list(dict.fromkeys(int(s) for s in seq_lens)) if "seq" in labels else [None]
    return [(b, s) for b in batches for s in seqs]
