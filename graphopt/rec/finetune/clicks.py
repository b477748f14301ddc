"""The click-through objective of the CTR models (``dlrm``, ``two-tower``).

Data: MovieLens-100K ratings as impressions, a rating >= 4 a click
(:mod:`graphopt.rec.data.ctr`), split at random 80/10/10. The model is sized
from the data (:meth:`ClickThrough.config_for`): ``dlrm:SIZE`` keeps the
size's widths (embedding dim, MLPs) and gets one table per feature with
``cardinality + 1`` rows, one dense input (age) and bags as wide as the
largest genre bag; ``two-tower:SIZE`` gets ``users + 1`` / ``items + 1`` rows,
the user's last ``history`` training clicks as its history bag and one
candidate (the rated item) per row. The synthetic ``dlrm:base`` /
``two-tower:base`` of the zoo are untouched.

Loss: binary cross-entropy of the click logit (the model's one score per
row). Evaluation: AUC (early stopping follows validation AUC) and logloss;
the baseline beside it scores each item by its smoothed training click rate.
DLRM's output bias starts at the training click rate's logit, so step 0 is
the constant predictor (logloss ~0.687), not a random one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from graphopt.errors import ModelNotFoundError
from graphopt.rec.data import DataError
from graphopt.rec.data.ctr import (
    ClickData,
    ClickSplit,
    ctr_metrics,
    dlrm_inputs,
    popularity_baseline,
    two_tower_inputs,
)
from graphopt.rec.finetune.objectives import Batch, Objective, check_seq_len
from graphopt.rec.finetune.precision import autocast

if TYPE_CHECKING:
    from graphopt.rec.finetune.loop import FinetuneConfig

__all__ = ["ClickThrough", "ClickRows", "ClickTask", "CTR_KINDS"]

CTR_KINDS = ("dlrm", "two-tower")
EVAL_BATCH = 1024


@dataclass
class ClickRows:
    """Encoded model inputs of some ratings and their clicks (0/1)."""

    inputs: dict[str, torch.Tensor]
    clicks: torch.Tensor

    def __len__(self) -> int:
        return len(self.clicks)

    def take(self, rows: torch.Tensor | slice) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: v[rows] for k, v in self.inputs.items()}, self.clicks[rows]


@dataclass
class ClickTask:
    """What the loop trains and evaluates on: the split and its encoded rows."""

    split: ClickSplit
    train: ClickRows
    valid: ClickRows
    test: ClickRows

    @property
    def num_items(self) -> int:
        return self.split.num_items


class ClickThrough(Objective):
    """Click prediction: binary cross-entropy of the model's one logit per row."""

    selection_metric: ClassVar[str] = "auc"
    #: a CTR step is cheap; larger batches than the sequence models' 64
    batch_size: ClassVar[int] = 256

    def __init__(self, kind: str):
        if kind not in CTR_KINDS:
            raise ValueError(f"no click objective for '{kind}'; one of {', '.join(CTR_KINDS)}")
        self.kind = kind  # type: ignore[misc]
        #: rows a training batch needs: dlrm's BatchNorm layers cannot train on one row
        self.min_batch = 2 if kind == "dlrm" else 1

    # ------------------------------------------------------------ the model
    def _sizes(self) -> dict[str, dict[str, Any]]:
        if self.kind == "dlrm":
            from graphopt.rec.zoo.dlrm import SIZES
        else:
            from graphopt.rec.zoo.two_tower import SIZES
        return SIZES

    def check_spec(self, size: str, seq_len: int | None) -> None:
        if size not in self._sizes():
            raise ModelNotFoundError(f"model '{self.kind}' has no size '{size}'; sizes: {', '.join(self._sizes())}")
        check_seq_len(self.kind, seq_len)  # two-tower's click history; dlrm reads none

    def config_for(self, size: str, data: Any, seq_len: int | None) -> dict[str, Any]:
        self.check_spec(size, seq_len)
        if not isinstance(data, ClickData):
            raise DataError(f"'{self.kind}' trains on click data (graphopt.rec.data.ctr.load_clicks), "
                            f"not on {type(data).__name__}; `graphopt finetune {self.kind}:{size}` loads it")
        if self.kind == "dlrm":
            from graphopt.rec.zoo.dlrm import ctr_config

            cards = data.cardinalities()
            return ctr_config(size, [n + 1 for n in cards.values()], dense=1, bag=data.max_genres)
        from graphopt.rec.zoo.two_tower import ctr_config as tt_config

        return tt_config(size, data.num_users, data.num_items, seq_len or self._sizes()[size]["history"])

    def build(self, cfg: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        if self.kind == "dlrm":
            from graphopt.rec.zoo.dlrm import DLRM

            model: nn.Module = DLRM(cfg)
        else:
            from graphopt.rec.zoo.two_tower import TwoTower

            model = TwoTower(cfg)
        with torch.no_grad():  # N(0, 1/dim) tables: pairwise dots of about unit size, not dim-sized
            for m in model.modules():
                if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                    m.weight.normal_(0.0, m.embedding_dim ** -0.5)
                    if m.padding_idx is not None:
                        m.weight[m.padding_idx].zero_()
        return model

    # ---------------------------------------------------------------- data
    def encode(self, split: ClickSplit, part: str, mcfg: dict[str, Any]) -> ClickRows:
        rows = split.rows(part)
        if self.kind == "dlrm":
            inputs = dlrm_inputs(split.data, rows)
        else:
            inputs = two_tower_inputs(split, rows, int(mcfg["history"]))
        return ClickRows(inputs, split.clicks(part))

    def split(self, data: Any, mcfg: dict[str, Any]) -> ClickTask:
        split = data.split(seed=0)
        return ClickTask(split, *(self.encode(split, part, mcfg) for part in ("train", "valid", "test")))

    def baseline(self, split: Any) -> dict[str, dict[str, float]]:
        return {part: popularity_baseline(split.split, part) for part in ("valid", "test")}

    @torch.no_grad()
    def init_bias(self, model: nn.Module, split: Any) -> None:
        if self.kind != "dlrm":  # the two-tower score is a plain dot product: no bias to set
            return
        rate = float(split.train.clicks.mean().clamp(1e-4, 1 - 1e-4))
        model.top[-1].bias.fill_(torch.logit(torch.tensor(rate)).item())

    # ------------------------------------------------------------- training
    def samples_per_epoch(self, train: Any, seq_len: int) -> int:
        return len(train)

    def batches(self, train: Any, cfg: FinetuneConfig, seq_len: int, mcfg: dict[str, Any],
                rng: random.Random) -> Iterator[Batch]:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        names = list(train.inputs)
        starts = list(range(0, len(order), cfg.batch_size))
        if len(starts) > 1 and len(order) - starts[-1] < self.min_batch:
            starts.pop()  # a last batch too small for BatchNorm joins the one before it
        for k, start in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else len(order)
            inputs, clicks = train.take(order[start:end])
            yield (*(inputs[n] for n in names), clicks)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        *inputs, clicks = batch
        logits = model(*inputs).float().reshape(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, clicks)

    # --------------------------------------------------------------- scoring
    def scores(self, model: nn.Module) -> Callable[..., torch.Tensor]:
        return lambda *inputs: model(*inputs)

    def evaluate(self, model: nn.Module, split: Any, cases: str, seq_len: int, mcfg: dict[str, Any],
                 precision: str, device: torch.device, users: int | None = None) -> dict[str, float]:
        """AUC and logloss on ``split``'s valid or test rows (the first ``users`` rows when given)."""
        model.eval()
        rows: ClickRows = split.valid if cases == "valid" else split.test
        n = len(rows) if users is None else min(users, len(rows))
        names = list(rows.inputs)
        parts = []
        with torch.inference_mode(), autocast(precision, device):
            for start in range(0, n, EVAL_BATCH):
                inputs, _ = rows.take(slice(start, min(n, start + EVAL_BATCH)))
                parts.append(model(*(inputs[k].to(device) for k in names)).float().reshape(-1).cpu())
        logits = torch.cat(parts) if parts else torch.zeros(0)
        return {**ctr_metrics(logits, rows.clicks[:n]), "users": float(n)}

    # ------------------------------------------------------- capture inputs
    def example_inputs(self, mcfg: dict[str, Any], batch: int = 4, seq: int | None = None,
                       seed: int = 0) -> dict[str, torch.Tensor]:
        """Zipf-skewed ids in each table's range (real rows come from :meth:`encode`)."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "dlrm":
            from graphopt.rec.zoo.dlrm import sparse_sampler

            return {"dense": torch.randn(batch, mcfg["dense"], generator=g), "sparse": sparse_sampler(mcfg)(batch, g)}
        from graphopt.rec.zoo.two_tower import input_sampler

        return input_sampler(mcfg)(batch, seq, g)

    def dynamic(self) -> dict[str, dict[int, str]]:
        if self.kind == "dlrm":
            return {"dense": {0: "batch"}, "sparse": {0: "batch"}}
        return {"user_ids": {0: "batch"}, "history": {0: "batch"}, "candidate_ids": {0: "batch"}}

    def input_ranges(self, mcfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
        if self.kind == "dlrm":
            return {"sparse": (0, min(mcfg["tables"]))}
        return {"user_ids": (1, mcfg["users"]), "history": (0, mcfg["items"]), "candidate_ids": (1, mcfg["items"])}
