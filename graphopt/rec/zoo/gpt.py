"""GPT-style recommender: a causal next-item model over item ids (SASRec-like, GPT-2 blocks).

``gpt-rec``: transformers ``GPT2Model`` reads the user's history as item-id
tokens (ids: 0 = padding, 1..items = items; left padding for short
histories) and the last position's hidden state is scored against the tied
item-embedding table, so output column ``i`` is the score of item id ``i``
(column 0, padding, is never a target). GPT-2's ``Conv1D`` projections are
captured as ``addmm``.

Positions count from each user's first real item (``cumsum(mask) - 1``), so
a history scores the same whatever left padding it gets, and appending one
item only adds the next position (what an incremental key/value cache needs).

``GPTRec.to_hf(path)`` writes the same weights as a ``GPT2LMHeadModel``
folder (tied ``lm_head``), which works as a MODEL on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.rec.zoo import ZooModel, register_model
from graphopt.rec.zoo.bert import _seq_inputs

__all__ = ["GPTRec", "SIZES", "gpt_config"]

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=32, layers=2, heads=4, intermediate=64, items=50, seq=16),
    # comparable to bert4rec:base (4 layers, width 256)
    "base": dict(hidden=256, layers=4, heads=4, intermediate=1024, items=1682, seq=64),
    # GPT-2 small shaped (12 layers, width 768): the size teams fine-tune, like bert4rec:large
    "large": dict(hidden=768, layers=12, heads=12, intermediate=3072, items=1682, seq=64),
}


def gpt_config(cfg: dict[str, Any], vocab: int) -> Any:
    """The ``GPT2Config`` of a gpt-rec size over ``vocab`` ids."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab,
        n_positions=max(512, int(cfg["seq"])),
        n_embd=cfg["hidden"],
        n_layer=cfg["layers"],
        n_head=cfg["heads"],
        n_inner=cfg["intermediate"],
        activation_function="gelu_new",
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


class GPTRec(nn.Module):
    """GPT-2 over item ids: history in, scores of item ids ``0..items`` for the next item out."""

    def __init__(self, items: int, cfg: dict[str, Any]):
        super().__init__()
        from transformers import GPT2Model

        self.items = items
        self.gpt = GPT2Model(gpt_config(cfg, items + 1))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(batch, seq, hidden)``; position ``t`` has read items ``<= t``."""
        limit = self.gpt.config.n_positions
        torch._check(input_ids.shape[-1] <= limit, lambda: f"gpt-rec reads at most {limit} items")
        # clamped to the table: a mask that is not 0/1 cannot index past it (on any runtime)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0, max=limit - 1)
        return self.gpt(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).last_hidden_state

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of item ids 0..items for hidden states ``h`` (..., hidden): the tied table."""
        return h @ self.gpt.wte.weight.t()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score(self.hidden(input_ids, attention_mask)[:, -1, :])

    def to_hf(self, path: str | Path) -> Path:
        """Write these weights as a ``GPT2LMHeadModel`` folder (tied head); returns the folder."""
        from transformers import GPT2LMHeadModel

        lm = GPT2LMHeadModel(self.gpt.config)
        lm.transformer.load_state_dict(self.gpt.state_dict())
        lm.tie_weights()
        lm.save_pretrained(str(path))
        return Path(path)


_DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def _build(size: str):
    def build(seed: int) -> ZooModel:
        cfg = dict(SIZES[size])
        torch.manual_seed(seed)
        model = GPTRec(cfg["items"], cfg).eval()
        return ZooModel(
            name=f"gpt-rec:{size}",
            module=model,
            config=cfg,
            make_inputs=_seq_inputs(cfg["items"], cfg["items"] + 1, append_mask=None),
            dynamic=_DYNAMIC,
            input_ranges={"input_ids": (1, cfg["items"] + 1), "attention_mask": (1, 2)},
            seq=cfg["seq"] if size != "tiny" else 16,
        )

    return build


for _size in SIZES:
    register_model("gpt-rec", _size, _build(_size))
