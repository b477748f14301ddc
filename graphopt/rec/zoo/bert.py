"""BERT-style recommenders built from transformers configs.

``bert4rec``: BertModel over item-id sequences; the last position holds the
[mask] token and is scored against the (tied) item embedding table, so the
output column ``i`` is the score of item id ``i`` (0 is padding).
``bert-cls``: BertForSequenceClassification with ``num_labels`` = items, the
classic fine-tuned-BERT next-item classifier.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphopt.rec.zoo import ZooModel, register_model

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=32, layers=2, heads=4, intermediate=64, items=50, seq=16),
    "base": dict(hidden=256, layers=4, heads=4, intermediate=1024, items=1682, seq=64),
    # BERT-base shaped (87M parameters with the item table): the size fine-tuned recommenders have
    "large": dict(hidden=768, layers=12, heads=12, intermediate=3072, items=1682, seq=64),
}


def _bert_config(cfg: dict[str, Any], vocab: int) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=cfg["hidden"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        intermediate_size=cfg["intermediate"],
        max_position_embeddings=max(512, cfg["seq"]),
        type_vocab_size=1,
        pad_token_id=0,
        attn_implementation="sdpa",
    )


class Bert4Rec(nn.Module):
    """BERT4Rec: item ids in, scores for every item id at the last position out.

    Ids: 0 = padding, 1..items = items, items+1 = [mask].
    """

    def __init__(self, items: int, cfg: dict[str, Any]):
        super().__init__()
        from transformers import BertModel

        self.items = items
        self.mask_id = items + 1
        self.bert = BertModel(_bert_config(cfg, items + 2), add_pooling_layer=False)
        hidden = cfg["hidden"]
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
        self.bias = nn.Parameter(torch.zeros(items + 1))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.transform(self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of item ids 0..items for hidden states ``h`` (..., hidden)."""
        table = self.bert.embeddings.word_embeddings.weight[: self.items + 1]
        return h @ table.t() + self.bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score(self.hidden(input_ids, attention_mask)[:, -1, :])


def _seq_inputs(items: int, vocab_high: int, append_mask: int | None):
    def make(batch: int = 4, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        seq = seq or 16
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, items + 1, (batch, seq), generator=g)
        if append_mask is not None:
            ids[:, -1] = append_mask
        mask = torch.ones(batch, seq, dtype=torch.long)
        # left padding on some rows, like real histories of different lengths
        pad = torch.randint(0, max(1, seq // 4), (batch,), generator=g)
        for row, p in enumerate(pad.tolist()):
            ids[row, :p] = 0
            mask[row, :p] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return make


_DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def _build_bert4rec(size: str):
    def build(seed: int) -> ZooModel:
        cfg = dict(SIZES[size])
        torch.manual_seed(seed)
        model = Bert4Rec(cfg["items"], cfg).eval()
        return ZooModel(
            name=f"bert4rec:{size}",
            module=model,
            config=cfg,
            make_inputs=_seq_inputs(cfg["items"], cfg["items"] + 2, append_mask=cfg["items"] + 1),
            dynamic=_DYNAMIC,
            input_ranges={"input_ids": (1, cfg["items"] + 2), "attention_mask": (1, 2)},
            seq=cfg["seq"] if size != "tiny" else 16,
        )

    return build


def _build_bert_cls(size: str):
    def build(seed: int) -> ZooModel:
        from transformers import BertForSequenceClassification

        cfg = dict(SIZES[size])
        torch.manual_seed(seed)
        config = _bert_config(cfg, cfg["items"] + 2)
        config.num_labels = cfg["items"]
        config.problem_type = "single_label_classification"
        model = BertForSequenceClassification(config).eval()
        return ZooModel(
            name=f"bert-cls:{size}",
            module=model,
            config=cfg,
            make_inputs=_seq_inputs(cfg["items"], cfg["items"] + 2, append_mask=None),
            dynamic=_DYNAMIC,
            input_ranges={"input_ids": (1, cfg["items"] + 1), "attention_mask": (1, 2)},
            seq=cfg["seq"] if size != "tiny" else 16,
        )

    return build


for _size in SIZES:
    register_model("bert4rec", _size, _build_bert4rec(_size))
    register_model("bert-cls", _size, _build_bert_cls(_size))
