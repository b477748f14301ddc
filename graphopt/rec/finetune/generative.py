"""Objectives of the generative families: GPT-style causal next-item and T5-style seq2seq.

=============  ==============================================================
``gpt-rec``    causal next-item (SASRec's objective): a window of the history
               in, the next item predicted at every position, over all items
``t5-rec``     seq2seq next-item (P5-like): the encoder reads a history
               prefix, one decoder step predicts the item that followed
=============  ==============================================================

Neither model has an output bias (their heads are the tied item table, as in
the Hugging Face models they export to), so ``popularity_init`` does nothing
for them. Both are scored like every sequence model: left-padded histories,
leave-one-out HR@10/NDCG@10 over all items.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from graphopt.errors import ModelNotFoundError
from graphopt.rec.data import encode_histories
from graphopt.rec.finetune.objectives import Batch, Objective, next_item_batches, windows

if TYPE_CHECKING:
    from graphopt.rec.finetune.loop import FinetuneConfig

__all__ = ["CausalNextItem", "Seq2SeqNextItem"]


def _sized(kind: str, sizes: dict[str, dict[str, Any]], size: str, num_items: int,
           seq_len: int | None) -> dict[str, Any]:
    if size not in sizes:
        raise ModelNotFoundError(f"model '{kind}' has no size '{size}'; sizes: {', '.join(sizes)}")
    cfg = dict(sizes[size])
    cfg["items"] = num_items
    cfg["seq"] = seq_len or cfg["seq"]
    return cfg


class CausalNextItem(Objective):
    """``gpt-rec``: windows of ``seq_len + 1`` items; position ``t`` predicts item ``t + 1``."""

    kind = "gpt-rec"

    def model_config(self, size: str, num_items: int, seq_len: int | None) -> dict[str, Any]:
        from graphopt.rec.zoo.gpt import SIZES

        return _sized(self.kind, SIZES, size, num_items, seq_len)

    def build(self, cfg: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        from graphopt.rec.zoo.gpt import GPTRec

        return GPTRec(cfg["items"], cfg)

    def batches(self, train: list[list[int]], cfg: FinetuneConfig, seq_len: int, mcfg: dict[str, Any],
                rng: random.Random) -> Iterator[Batch]:
        samples = [w for seq in train if len(seq) >= 2 for w in windows(seq, seq_len + 1, rng)]
        rng.shuffle(samples)
        for start in range(0, len(samples), cfg.batch_size):
            chunk = samples[start:start + cfg.batch_size]
            ids, attn = encode_histories([w[:-1] for w in chunk], seq_len)
            labels, _ = encode_histories([w[1:] for w in chunk], seq_len)
            labels[attn == 0] = -100
            yield ids, attn, labels

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ids, attn, labels = batch
        picked = labels != -100
        hidden = model.hidden(ids, attn)[picked]
        return nn.functional.cross_entropy(model.score(hidden).float(), labels[picked])


class Seq2SeqNextItem(Objective):
    """``t5-rec``: (history prefix, next item) pairs at the last cut and random earlier ones."""

    kind = "t5-rec"

    def model_config(self, size: str, num_items: int, seq_len: int | None) -> dict[str, Any]:
        from graphopt.rec.zoo.t5 import SIZES

        return _sized(self.kind, SIZES, size, num_items, seq_len)

    def build(self, cfg: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        from graphopt.rec.zoo.t5 import T5Rec

        return T5Rec(cfg["items"], cfg)

    def samples_per_epoch(self, train: list[list[int]], seq_len: int) -> int:
        return 2 * super().samples_per_epoch(train, seq_len)

    def batches(self, train: list[list[int]], cfg: FinetuneConfig, seq_len: int, mcfg: dict[str, Any],
                rng: random.Random) -> Iterator[Batch]:
        yield from next_item_batches(train, cfg.batch_size, seq_len, rng)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ids, attn, targets = batch
        start = torch.zeros_like(ids[:, :1])  # the decoder's start token
        logits = model.logits(ids, attn, start)[:, 0]
        return nn.functional.cross_entropy(logits.float(), targets)
