"""DLRM-style CTR model: bottom MLP (Linear+BatchNorm+ReLU) over dense
features, one ``nn.EmbeddingBag`` (sum) per sparse feature, pairwise dot
interaction, top MLP to one logit (the click logit).

``dlrm:tiny``/``dlrm:base`` keep synthetic table sizes (base: eight tables,
200,000 down to 100 rows, bags of 8 ids); their ``make_inputs`` draw each
feature's ids from its own table with a Zipf skew (:mod:`.skew`). A model
for real data is sized from the data with :func:`ctr_config` (one table per
feature, rows = the feature's cardinality + 1, id 0 = padding, so single ids
and multi-hot bags share one ``(batch, features, bag)`` input); ``graphopt
finetune dlrm:base --data ml-100k`` builds it that way
(:mod:`graphopt.rec.data.ctr`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphopt.rec.zoo import ZooModel, register_model
from graphopt.rec.zoo.skew import ZipfIds

__all__ = ["DLRM", "SIZES", "ctr_config", "sparse_sampler"]

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dense=13, tables=[100, 80, 60, 40], dim=8, bag=3, bottom=[16, 8], top=[16, 1]),
    "base": dict(
        dense=13,
        tables=[200_000, 100_000, 50_000, 20_000, 10_000, 5_000, 1_000, 100],
        dim=64,
        bag=8,
        bottom=[512, 256, 64],
        top=[512, 256, 1],
    ),
}


def _mlp(sizes: list[int], batchnorm: bool, last_act: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        last = i == len(sizes) - 2
        if batchnorm and not last:
            layers.append(nn.BatchNorm1d(b))
        if not last or last_act:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        dim = cfg["dim"]
        assert cfg["bottom"][-1] == dim, "bottom MLP must end at the embedding dim"
        self.bottom = _mlp([cfg["dense"], *cfg["bottom"]], batchnorm=True, last_act=True)
        pad = 0 if cfg.get("padding") else None
        self.tables = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum", padding_idx=pad) for n in cfg["tables"])
        f = len(cfg["tables"]) + 1
        li, lj = torch.tril_indices(f, f, offset=-1)
        self.register_buffer("li", li, persistent=False)
        self.register_buffer("lj", lj, persistent=False)
        self.top = _mlp([dim + len(li), *cfg["top"]], batchnorm=False, last_act=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)
        embs = [table(sparse[:, t]) for t, table in enumerate(self.tables)]
        z = torch.stack([x, *embs], dim=1)
        inter = torch.bmm(z, z.transpose(1, 2))[:, self.li, self.lj]
        return self.top(torch.cat([x, inter], dim=1))


def ctr_config(size: str, tables: list[int], dense: int, bag: int) -> dict[str, Any]:
    """``size``'s widths with tables, dense width and bag length from the data.

    ``tables`` are row counts including the padding row 0 (cardinality + 1).
    """
    cfg = dict(SIZES[size])
    cfg.update(tables=[int(n) for n in tables], dense=int(dense), bag=int(bag), padding=True)
    return cfg


def sparse_sampler(cfg: dict[str, Any]):  # -> Callable[[int, Generator], Tensor]
    """``draw(batch, generator) -> (batch, tables, bag)`` ids, each table's own
    range with a Zipf skew (ids start at 1 where id 0 is padding)."""
    low = 1 if cfg.get("padding") else 0
    samplers = [ZipfIds(n - low, low=low, table_seed=t) for t, n in enumerate(cfg["tables"])]

    def draw(batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.stack([s((batch, cfg["bag"]), generator) for s in samplers], dim=1)

    return draw


def _build(size: str):
    def build(seed: int) -> ZooModel:
        cfg = dict(SIZES[size])
        torch.manual_seed(seed)
        model = DLRM(cfg)
        # non-trivial BN statistics, as after training, so BN folding is tested for real
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        model.eval()
        smallest = min(cfg["tables"])
        draw = sparse_sampler(cfg)

        def make(batch: int = 4, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(seed)
            dense = torch.randn(batch, cfg["dense"], generator=g)
            return {"dense": dense, "sparse": draw(batch, g)}

        return ZooModel(
            name=f"dlrm:{size}",
            module=model,
            config=cfg,
            make_inputs=make,
            dynamic={"dense": {0: "batch"}, "sparse": {0: "batch"}},
            input_ranges={"sparse": (0, smallest)},
        )

    return build


for _size in SIZES:
    register_model("dlrm", _size, _build(_size))
