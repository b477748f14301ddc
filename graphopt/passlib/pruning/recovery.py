"""Recovery after pruning: distill the pruned Program towards the unpruned one."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from graphopt.errors import PassOptionError, PreconditionError
from graphopt.ir.fx import fetch_attr

__all__ = ["recover"]

log = logging.getLogger(__name__)


def recover(
    pruned: Any,
    teacher: Any,
    inputs: Iterable[Sequence[torch.Tensor]],
    steps: int = 50,
    lr: float = 1e-4,
) -> dict[str, float]:
    """Briefly fine-tune ``pruned``'s float weights in place by distillation.

    ``pruned`` and ``teacher`` are Programs (the pruned one and the unpruned
    one); ``inputs`` is an iterable of positional input tuples (cycled for
    ``steps`` Adam steps at learning rate ``lr``). The loss is the MSE between
    the pruned and the teacher outputs (float outputs only). Returns
    ``{"loss_before", "loss_after", "steps"}``, the losses averaged over the
    batches. There is no CLI front end: call it after a pruning pipeline.
    """
    batches = [tuple(b) for b in inputs]
    if not batches:
        raise PreconditionError("recover needs at least one input batch")
    if steps < 0 or lr <= 0:
        raise PassOptionError(f"recover: steps must be >= 0 and lr > 0, got steps={steps} lr={lr}")
    targets = [tuple(teacher(*b)) for b in batches]
    gm = pruned.gm
    params = {n.target: fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    params = {t: p for t, p in params.items() if isinstance(p, torch.nn.Parameter) and p.is_floating_point()}
    flags = {t: p.requires_grad for t, p in params.items()}

    def loss_of(b: tuple, ref: tuple) -> torch.Tensor:
        out = gm(*b)
        out = out if isinstance(out, (tuple, list)) else (out,)
        terms = [torch.nn.functional.mse_loss(o.float(), r.float()) for o, r in zip(out, ref) if r.is_floating_point()]
        return torch.stack(terms).sum()

    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum(float(loss_of(b, r)) for b, r in zip(batches, targets)) / len(batches))

    before = mean_loss()
    try:
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(list({id(p): p for p in params.values()}.values()), lr=lr)
        for step in range(steps):
            i = step % len(batches)
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_of(batches[i], targets[i]).backward()
            opt.step()
    finally:
        for t, p in params.items():
            p.grad = None
            p.requires_grad_(flags[t])
    after = mean_loss()
    log.info("recover: distillation loss %.4g -> %.4g in %d steps", before, after, steps)
    return {"loss_before": before, "loss_after": after, "steps": float(steps)}
