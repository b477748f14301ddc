"""Numeric and ranking comparison of outputs against a reference.

Used by verify-each, the OptimizeReport's drift, runners' conformance tests
and the benchmark harness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["max_abs_error", "allclose_report", "cosine", "topk_overlap", "drift"]


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def allclose_report(
    outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], tol: float
) -> str | None:
    """None when every output is within ``tol`` (atol = rtol = tol) of the
    reference; otherwise a one-line reason naming the output and the error."""
    if len(outputs) != len(reference):
        return f"{len(outputs)} outputs, expected {len(reference)}"
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        if tuple(out.shape) != tuple(ref.shape):
            return f"output {i}: shape {list(out.shape)}, expected {list(ref.shape)}"
        if not ref.is_floating_point():
            if not torch.equal(out.to(ref.dtype), ref):
                return f"output {i}: integer values differ"
            continue
        o, r = out.detach().double(), ref.detach().double()
        if not torch.isfinite(o).all() and torch.isfinite(r).all():
            return f"output {i}: non-finite values appeared"
        err = (o - r).abs()
        bound = tol + tol * r.abs()
        if (err > bound).any():
            return f"output {i}: max abs error {float(err.max()):.3g} exceeds tolerance {tol:g}"
    return None


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    denom = float(a.norm() * b.norm())
    if denom == 0.0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float(a @ b) / denom


def topk_overlap(scores: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """Mean |topk(scores) ∩ topk(reference)| / k over rows (last dim = items)."""
    if scores.dim() == 1:
        scores, reference = scores[None], reference[None]
    k = min(k, scores.shape[-1])
    a = scores.float().reshape(-1, scores.shape[-1]).topk(k, dim=-1).indices
    b = reference.float().reshape(-1, reference.shape[-1]).topk(k, dim=-1).indices
    hits = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1).double()
    return float((hits / k).mean())


def drift(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], k: int = 10) -> dict[str, float]:
    """Max abs/rel error and cosine over all outputs; top-k overlap of the
    first output when it scores items (last dim > k)."""
    max_abs = max_rel = 0.0
    cos = 1.0
    for out, ref in zip(outputs, reference):
        if not ref.is_floating_point():
            continue
        err = max_abs_error(out, ref)
        scale = float(ref.detach().double().abs().max()) if ref.numel() else 0.0
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale else 0.0)
        cos = min(cos, cosine(out, ref))
    result = {"max_abs": max_abs, "max_rel": max_rel, "cosine": cos}
    if reference and reference[0].is_floating_point() and reference[0].dim() >= 1 and reference[0].shape[-1] > k:
        result[f"top{k}_overlap"] = topk_overlap(outputs[0], reference[0], k)
    return {key: (v if math.isfinite(v) else float("nan")) for key, v in result.items()}
