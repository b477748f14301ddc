"""``stages``: run a Program as n stages, one process per stage.

Lowering needs a Program that the ``split-stages`` pass partitioned (add
``split-stages{n=N}`` to the pipeline); it cuts the Program where that
partition says and writes one saved Program per stage, ``stage0.pt2`` ..
``stage{n-1}.pt2``, plus the manifest. Running uses ``torch.distributed``
(gloo on CPU, NCCL on CUDA) and a GPipe schedule from
``torch.distributed.pipelining``: the batch is cut into ``microbatches``
that flow through the stages, and the last stage's merged outputs come back
to rank 0, equal to the single-process Program.

Rank 0 is the process holding the Runner; it hosts stage 0. The other ranks
are either spawned on this host (``launch=local``: ports picked free on
127.0.0.1) or started elsewhere with ``graphopt serve-stages ARTIFACT`` and
the torchrun variables ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE`` (``launch=external``, the default when ``WORLD_SIZE`` is set).
Every rank must serve the same artifact: each publishes the sha256 of the
stage files from its manifest when it joins, and rank 0 refuses a rank whose
files differ (both sides say which). A rank that does not join, or whose
MASTER_PORT never answers, within ``join_timeout`` fails with the address it
waited on; a stage that dies mid-run makes the others fail within
``timeout`` seconds (gloo sees the closed connection at once) instead of
hanging.

Modules: ``backend`` (lowering, registration), ``runner`` (rank 0),
``worker`` (ranks >= 1), ``host`` (one rank's stage and schedule),
``rendezvous`` (store, keys, process group).
"""

from __future__ import annotations

from graphopt.runtimes.stages.backend import (
    BACKEND,
    StagesBackend,
    cut_positions,
    load_stages,
    lower_stages,
    run_sequential,
)
from graphopt.runtimes.stages.runner import StagesRunner
from graphopt.runtimes.stages.worker import serve_stage

__all__ = [
    "BACKEND",
    "StagesBackend",
    "StagesRunner",
    "cut_positions",
    "lower_stages",
    "load_stages",
    "run_sequential",
    "serve_stage",
]
