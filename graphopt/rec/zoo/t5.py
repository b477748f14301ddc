"""T5-style recommender (P5-like): the encoder reads the history, one decoder step scores the next item.

``t5-rec``: transformers ``T5ForConditionalGeneration`` over item-id tokens
(ids: 0 = padding and the decoder's start token, 1..items = items; left
padding for short histories). The decoder runs one step from the start token
and its tied output head scores every id, so output column ``i`` is the
score of item id ``i`` (column 0 is never a target). T5's attention adds a
relative-position bias to unscaled scores; its feed-forward is ReLU.

``T5Rec.to_hf(path)`` writes the model as a ``T5ForConditionalGeneration``
folder, which works as a MODEL on the command line (the decoder input is
then an input of the captured Program).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.rec.zoo import ZooModel, register_model
from graphopt.rec.zoo.bert import _seq_inputs

__all__ = ["T5Rec", "SIZES", "t5_config"]

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=32, layers=2, decoder_layers=1, heads=4, kv=8, intermediate=64, items=50, seq=16),
    # encoder comparable to bert4rec:base (4 layers, width 256); two decoder layers run one step
    "base": dict(hidden=256, layers=4, decoder_layers=2, heads=4, kv=64, intermediate=1024, items=1682, seq=64),
}


def t5_config(cfg: dict[str, Any], vocab: int) -> Any:
    """The ``T5Config`` of a t5-rec size over ``vocab`` ids."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab,
        d_model=cfg["hidden"],
        d_kv=cfg["kv"],
        d_ff=cfg["intermediate"],
        num_layers=cfg["layers"],
        num_decoder_layers=cfg["decoder_layers"],
        num_heads=cfg["heads"],
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="relu",
        pad_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=None,
        use_cache=False,
        tie_word_embeddings=True,
        attn_implementation="eager",  # T5 has no SDPA path: graphopt's fuse-attention makes one
    )


class T5Rec(nn.Module):
    """T5 over item ids: history in, scores of item ids ``0..items`` for the next item out."""

    def __init__(self, items: int, cfg: dict[str, Any]):
        super().__init__()
        from transformers import T5ForConditionalGeneration

        self.items = items
        self.t5 = T5ForConditionalGeneration(t5_config(cfg, items + 1))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(batch, steps, items + 1)`` for ``decoder_input_ids``."""
        return self.t5(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                       use_cache=False).logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        start = torch.zeros_like(input_ids[:, :1])  # decoder_start_token_id
        return self.logits(input_ids, attention_mask, start)[:, -1, :]

    def to_hf(self, path: str | Path) -> Path:
        """Write the model as a ``T5ForConditionalGeneration`` folder; returns the folder."""
        self.t5.save_pretrained(str(path))
        return Path(path)


_DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def _build(size: str):
    def build(seed: int) -> ZooModel:
        cfg = dict(SIZES[size])
        torch.manual_seed(seed)
        model = T5Rec(cfg["items"], cfg).eval()
        return ZooModel(
            name=f"t5-rec:{size}",
            module=model,
            config=cfg,
            make_inputs=_seq_inputs(cfg["items"], cfg["items"] + 1, append_mask=None),
            dynamic=_DYNAMIC,
            input_ranges={"input_ids": (1, cfg["items"] + 1), "attention_mask": (1, 2)},
            seq=cfg["seq"] if size != "tiny" else 16,
        )

    return build


for _size in SIZES:
    register_model("t5-rec", _size, _build(_size))
