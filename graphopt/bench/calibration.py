"""The bench's own calibration batches: held-out batches of its inputs at every length it judges."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from graphopt.passlib.calibration import (
    CALIBRATION_SEED,
    DEFAULT_CALIBRATION_BATCH,
    DEFAULT_CALIBRATION_BATCHES,
)

__all__ = ["bench_calibration"]


def bench_calibration(inputs: Callable[[int, int | None, int], tuple[torch.Tensor, ...]],
                      shapes: Sequence[tuple[int, int | None]]) -> tuple[list[tuple[torch.Tensor, ...]], str]:
    """Held-out batches of the bench's own inputs (seeds 1000+, apart from the timed ones) and the
    report's note. The int8 pipelines calibrate on the first ones and their accuracy guard scores
    the last quarter; the batches take the bench's sequence lengths in turn, so the ranges and the
    held-out quarter see every length the variants are judged on (calibrated at seq 64 alone,
    bert4rec:base's int8-bf16 kept top-10 0.995 at seq 64 and 0.981 at seq 200)."""
    seqs = list(dict.fromkeys(s for _, s in shapes)) or [None]
    batches = [inputs(DEFAULT_CALIBRATION_BATCH, seqs[i % len(seqs)], CALIBRATION_SEED + i)
               for i in range(DEFAULT_CALIBRATION_BATCHES)]
    where = "seq " + ", ".join(str(s) for s in seqs) + (" in turn" if len(seqs) > 1 else "")
    return batches, (f"calibration (int8 pipelines, PT2E peers): {DEFAULT_CALIBRATION_BATCHES} batches of "
                     f"{DEFAULT_CALIBRATION_BATCH} of the bench's inputs (seeds 1000+), {where}")
