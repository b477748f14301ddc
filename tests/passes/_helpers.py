"""Shared checks for pass tests: validity at two shapes and numerics vs the input Program."""

from __future__ import annotations

import torch

from graphopt import Program


def assert_equivalent(before: Program, after: Program, tol: float, shapes=((None, None), (2, 24))) -> None:
    """Lint + run ``after`` at the capture shape and another, outputs within ``tol`` of ``before``."""
    after.gm.graph.lint()
    for batch, seq in shapes:
        inputs = before.sample_inputs(batch=batch, seq=seq, seed=11)
        for out, ref in zip(after(*inputs), before(*inputs)):
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
