"""Per-channel importance of a coupled group, and which channels to remove.

Importance is summed over the group's weight slices: ``l1`` (sum |w|),
``l2`` (L2 norm per slice) or ``taylor`` (sum |w * dL/dw| over calibration
batches, :func:`taylor_saliency`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.fx

from graphopt.errors import PassOptionError, PreconditionError
from graphopt.ir.fx import fetch_attr
from graphopt.passlib.pruning.groups import PruneGroup

__all__ = ["CRITERIA", "check_ratio", "group_importance", "taylor_saliency", "select_removals"]

CRITERIA = ("l1", "l2", "taylor")


def check_ratio(ratio: float) -> str | None:
    """Option check shared by the pruning passes: ratio in [0, 1)."""
    if not 0.0 <= ratio < 1.0:
        return f"ratio must be in [0, 1), got {ratio}; 0 keeps everything, 0.5 removes half"
    return None


def group_importance(
    gm: torch.fx.GraphModule, group: PruneGroup, criterion: str,
    saliency: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Importance of each channel: a criterion summed over the group's weight slices."""
    scores = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slices:
        if not s.score:
            continue
        target = s.node.args[s.arg].target
        w = fetch_attr(gm, target).detach().double()
        if criterion == "taylor":
            if saliency is None or target not in saliency:
                raise PreconditionError(f"taylor importance has no gradient for {target}")
            w = saliency[target].double()
        span = w.narrow(s.dim, s.offset, group.size * s.width)
        span = span.movedim(s.dim, 0).reshape(group.size, s.width, -1)
        if criterion == "l2":
            scores += span.pow(2).sum(dim=(1, 2)).sqrt()
        else:  # l1, and taylor's |w * g| is already non-negative
            scores += span.abs().sum(dim=(1, 2))
    return scores


def _pseudo_label_loss(out: torch.Tensor) -> torch.Tensor:
    """Loss without labels: the model's own top item (or sign for one logit)."""
    out = out.float()
    if out.dim() >= 1 and out.shape[-1] > 1:
        flat = out.reshape(-1, out.shape[-1])
        return torch.nn.functional.cross_entropy(flat, flat.argmax(-1).detach())
    return torch.nn.functional.binary_cross_entropy_with_logits(out, (out > 0).float().detach())


def taylor_saliency(
    gm: torch.fx.GraphModule, targets: Iterable[str], batches: Sequence[Sequence[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Sum over ``batches`` of |w * dL/dw| for each parameter in ``targets``.

    L is a pseudo-label loss on the first output (cross-entropy against the
    model's own argmax; BCE against its own sign for a single logit), so no
    labels are needed. Gradients are cleared and ``requires_grad`` restored.
    """
    if not batches:
        raise PreconditionError(
            "criterion=taylor needs calibration batches; pass calibration_data=[...] to graphopt.optimize"
        )
    params = {t: fetch_attr(gm, t) for t in dict.fromkeys(targets)}
    flags = {t: p.requires_grad for t, p in params.items()}
    acc = {t: torch.zeros_like(p, dtype=torch.float64) for t, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        for batch in batches:
            with torch.enable_grad():
                out = gm(*batch)
                first = out[0] if isinstance(out, (tuple, list)) else out
                _pseudo_label_loss(first).backward()
            for t, p in params.items():
                if p.grad is not None:
                    acc[t] += (p.detach() * p.grad).double().abs()
                p.grad = None
    finally:
        for t, p in params.items():
            p.grad = None
            p.requires_grad_(flags[t])
    return acc


def select_removals(
    groups: Sequence[PruneGroup], scores: Sequence[torch.Tensor], ratio: float, scope: str
) -> list[list[int]]:
    """Channels to remove per group: the floor(ratio * size) lowest per group
    (``layer``), or the floor(ratio * total) lowest of all groups, each group's
    scores normalized by its mean (``global``). Raises PassOptionError (before
    any change) when a group would lose every channel."""
    if scope == "layer":
        out = [sorted(torch.argsort(s)[: math.floor(ratio * g.size)].tolist()) for g, s in zip(groups, scores)]
    else:
        flat = [(float(s[c] / s.mean()) if float(s.mean()) else 0.0, gi, c)
                for gi, s in enumerate(scores) for c in range(len(s))]
        flat.sort()
        n = math.floor(ratio * len(flat))
        out = [[] for _ in groups]
        for _, gi, c in flat[:n]:
            out[gi].append(c)
        out = [sorted(x) for x in out]
    for g, rm in zip(groups, out):
        if len(rm) >= g.size:
            raise PassOptionError(
                f"ratio={ratio} scope={scope} would remove all {g.size} channels of {g.name}; "
                "lower the ratio or use scope=layer"
            )
    return out


# ------------------------------------------------------------------ rewrite
