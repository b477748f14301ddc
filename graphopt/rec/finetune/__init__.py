"""Fine-tune the zoo recommenders on MovieLens-100K: the loop (:mod:`.loop`),
per-kind objectives (:mod:`.objectives`), precision (:mod:`.precision`) and
checkpoints (:mod:`.checkpoint`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from graphopt.rec.finetune.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    Checkpoint,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from graphopt.rec.finetune.loop import FinetuneConfig, FinetuneResult, finetune
from graphopt.rec.finetune.objectives import Objective, get_objective, model_kinds, register_objective
from graphopt.rec.finetune.precision import resolve_precision

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "Checkpoint",
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "Objective",
    "build_model",
    "finetune",
    "get_objective",
    "model_kinds",
    "register_objective",
    "save_checkpoint",
    "load_checkpoint",
    "is_checkpoint",
    "resolve_precision",
]


def build_model(kind: str, cfg: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
    """The architecture of ``kind`` for ``cfg`` (seed torch before calling).

    ``pretrained`` only matters for ``bert4rec-text`` (MiniLM encoder weights).
    """
    return get_objective(kind).build(cfg, pretrained=pretrained)
