"""Two-tower retrieval model: a user tower (id embedding + mean of history
item embeddings + MLP) and an item tower (embedding + MLP); the score of each
candidate is the dot product of the two towers' outputs.

``make_inputs`` draws users, history items and candidates with a Zipf skew
(:mod:`.skew`), the history and the candidates from one item popularity.
:func:`ctr_config` sizes the model for real data (rows = users + 1 and
items + 1, id 0 = padding, so a short click history is padded with 0 and its
mean covers the real items only); ``graphopt finetune two-tower:base --data
ml-100k`` trains it as a click model, one candidate per row whose score is the
click logit (:mod:`graphopt.rec.data.ctr`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphopt.rec.zoo import ZooModel, register_model
from graphopt.rec.zoo.skew import ZipfIds

__all__ = ["TwoTower", "SIZES", "ctr_config", "input_sampler"]

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(users=100, items=200, dim=16, hidden=32, history=8, candidates=20),
    "base": dict(users=10_000, items=1682, dim=64, hidden=256, history=50, candidates=100),
}


class TwoTower(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        d, h = cfg["dim"], cfg["hidden"]
        pad = 0 if cfg.get("padding") else None
        self.user_emb = nn.Embedding(cfg["users"], d)
        self.history = nn.EmbeddingBag(cfg["items"], d, mode="mean", padding_idx=pad)
        self.user_tower = nn.Sequential(nn.Linear(2 * d, h), nn.ReLU(), nn.Linear(h, d))
        self.item_emb = nn.Embedding(cfg["items"], d)
        self.item_tower = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, user_ids: torch.Tensor, history: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        user = self.user_tower(torch.cat([self.user_emb(user_ids), self.history(history)], dim=-1))
        items = self.item_tower(self.item_emb(candidate_ids))
        return (items @ user.unsqueeze(-1)).squeeze(-1)


def ctr_config(size: str, users: int, items: int, history: int) -> dict[str, Any]:
    """``size``'s widths with rows for ``users``/``items`` (+1 each: id 0 is
    padding), ``history`` clicked items per user and one candidate per row."""
    cfg = dict(SIZES[size])
    cfg.update(users=int(users) + 1, items=int(items) + 1, history=int(history), candidates=1, padding=True)
    return cfg


def input_sampler(cfg: dict[str, Any]):  # -> Callable[[int, int | None, Generator], dict]
    """``draw(batch, history, generator)``: Zipf-skewed users, history items
    and candidates (one item popularity for both), ids from 1 where 0 pads."""
    low = 1 if cfg.get("padding") else 0
    users = ZipfIds(cfg["users"] - low, low=low, table_seed=0)
    items = ZipfIds(cfg["items"] - low, low=low, table_seed=1)

    def draw(batch: int, history: int | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            "user_ids": users((batch,), generator),
            "history": items((batch, history or cfg["history"]), generator),
            "candidate_ids": items((batch, cfg["candidates"]), generator),
        }

    return draw


def _build(size: str):
    def build(seed: int) -> ZooModel:
        cfg = dict(SIZES[size])
        torch.manual_seed(seed)
        model = TwoTower(cfg).eval()
        draw = input_sampler(cfg)

        def make(batch: int = 4, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
            return draw(batch, seq, torch.Generator().manual_seed(seed))

        return ZooModel(
            name=f"two-tower:{size}",
            module=model,
            config=cfg,
            make_inputs=make,
            dynamic={"user_ids": {0: "batch"}, "history": {0: "batch"}, "candidate_ids": {0: "batch"}},
            input_ranges={
                "user_ids": (0, cfg["users"]),
                "history": (0, cfg["items"]),
                "candidate_ids": (0, cfg["items"]),
            },
        )

    return build


for _size in SIZES:
    register_model("two-tower", _size, _build(_size))
