"""Structured pruning: coupled-parameter groups (:mod:`.groups`), importance and
selection (:mod:`.importance`), the graph rewrite (:mod:`.rewrite`) and
distillation recovery (:mod:`.recovery`). The prune-heads/-ffn/-linear passes
(``passes/_ratio_prune.py``) and prune-embeddings are built on it.

Recovery has no CLI front end: call :func:`recover` from Python after a
pruning pipeline (``graphopt.optimize``), with the unpruned Program as teacher.
"""

from graphopt.passlib.pruning.groups import (
    ParamSlice,
    PruneGroup,
    ShapeEdit,
    find_channel_groups,
    find_head_groups,
)
from graphopt.passlib.pruning.importance import (
    CRITERIA,
    check_ratio,
    group_importance,
    select_removals,
    taylor_saliency,
)
from graphopt.passlib.pruning.recovery import recover
from graphopt.passlib.pruning.rewrite import apply_groups

__all__ = [
    "CRITERIA",
    "ParamSlice",
    "ShapeEdit",
    "PruneGroup",
    "check_ratio",
    "find_channel_groups",
    "find_head_groups",
    "group_importance",
    "taylor_saliency",
    "select_removals",
    "apply_groups",
    "recover",
]
