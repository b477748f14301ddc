"""Two-tower retrieval model: a user tower (id embedding + mean of history
item embeddings + MLP) and an item tower (embedding + MLP); the score of each
candidate is the dot product of the two towers' outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphopt.rec.zoo import ZooModel, register_model

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(users=100, items=200, dim=16, hidden=32, history=8, candidates=20),
    "base": dict(users=10_000, items=1682, dim=64, hidden=256, history=50, candidates=100),
}


class TwoTower(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        d, h = cfg["dim"], cfg["hidden"]
        self.user_emb = nn.Embedding(cfg["users"], d)
        self.history = nn.EmbeddingBag(cfg["items"], d, mode="mean")
        self.user_tower = nn.Sequential(nn.Linear(2 * d, h), nn.ReLU(), nn.Linear(h, d))
        self.item_emb = nn.Embedding(cfg["items"], d)
        self.item_tower = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, user_ids: torch.Tensor, history: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        user = self.user_tower(torch.cat([self.user_emb(user_ids), self.history(history)], dim=-1))
        items = self.item_tower(self.item_emb(candidate_ids))
        return (items @ user.unsqueeze(-1)).squeeze(-1)


def _build(size: str):
    def build(seed: int) -> ZooModel:
        cfg = dict(SIZES[size])
        torch.manual_seed(seed)
        model = TwoTower(cfg).eval()

        def make(batch: int = 4, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(seed)
            return {
                "user_ids": torch.randint(0, cfg["users"], (batch,), generator=g),
                "history": torch.randint(0, cfg["items"], (batch, seq or cfg["history"]), generator=g),
                "candidate_ids": torch.randint(0, cfg["items"], (batch, cfg["candidates"]), generator=g),
            }

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
