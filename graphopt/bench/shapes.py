"""The (batch, seq) points a bench measures, checked against what the Program can run."""

from __future__ import annotations

from collections.abc import Sequence

from graphopt.errors import PipelineParseError
from graphopt.ir.program import Program
from graphopt.runtime.contract import dim_ranges, size_outside

__all__ = ["bench_shapes", "unnamed_dims"]


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
    if "seq" not in labels and unnamed_dims(program):  # was: --seq-lens silently ran only the captured sizes
        notes.append(f"--seq-lens ignored: {unnamed_dims(program)}")
    return [(b, s) for b in batches for s in seqs]


def unnamed_dims(program: Program) -> str | None:
    """When dynamic dims other than batch and seq exist and none is labelled 'seq' (``dynamic=True``
    labels a sequence dim ``ids_dim1``): what they are and how to name one, else None."""
    labels = program.dynamic_labels()
    others = sorted(labels - {"batch", "seq"})
    if not others or "seq" in labels:
        return None
    where = next(f"{{'{spec.name}': {{{d}: 'seq'}}}}" for spec in program.inputs
                 for d, label in spec.dynamic.items() if label == others[0])
    return (f"no dim of {program.name} is labelled 'seq' (its other dynamic dims, {', '.join(others)}, run at their "
            f"captured sizes); name the sequence dim at capture: dynamic={where}")
