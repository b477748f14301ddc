"""A Hugging Face model folder as graphopt serves it (``graphopt ... MODEL=folder``).

What the bare model leaves to its caller, which a served folder cannot:

- **positions from the mask** for decoder-only models (GPT-2, Llama, Qwen2, ...): a
  left-padded history gets positions ``cumsum(mask) - 1``, as ``generate()`` computes
  them, so it scores as the same history unpadded (the bare model counts positions
  over the padding: a history of 14 events in a row of 16 scored as events 2..15).
  Encoders (BERT, RoBERTa) keep their own positions.
- **the last position only** for decoder-only models: ``logits`` (or
  ``last_hidden_state``) ``[:, -1]``, the next item's scores, as the zoo's gpt-rec
  returns them; ``prune-positions`` then runs the last layer on that row alone, and
  the folder lowers to incremental prefill/step (``--max-history``).
- **the sequence bound of a learned position table** (``wpe``, ``position_embeddings``):
  ``torch._check(seq <= rows)`` (less the padding offset RoBERTa's positions start
  after), so torch.export proves the bound and the input contract refuses a longer
  request in one line. GPT-2 builds its positions with ``arange`` and RoBERTa with a
  ``cumsum`` before the lookup, so nothing else bounds them: a longer request aborted
  the Inductor runner's process.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["FolderModel", "position_limit", "positions_from_mask"]


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model's learned position table covers, or None (relative or
    rotary positions: T5, Llama)."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and leaf in ("wpe", "position_embeddings"):
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0  # RoBERTa: after padding
            return int(module.num_embeddings) - offset
    return None


def positions_from_mask(model: nn.Module) -> bool:
    """Whether the model is decoder-only and takes ``position_ids``: its config's type has a
    causal-LM class and no masked-LM one (BERT has both and keeps its own positions)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = model.config  # type: ignore[attr-defined]
    kind = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False) or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    return kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES and "position_ids" in inspect.signature(model.forward).parameters


class FolderModel(nn.Module):
    """``model(input_ids, attention_mask[, decoder_input_ids])`` with positions from the mask
    (decoder-only models) and the position table's bound checked (see the module)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.max_seq = position_limit(model)
        self.from_mask = positions_from_mask(model)
        self.takes_cache = "use_cache" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor | None = None) -> Any:
        if self.max_seq is not None:
            torch._check(input_ids.shape[1] <= self.max_seq)
        kwargs: dict[str, Any] = {}
        if self.from_mask:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if decoder_input_ids is not None:
            kwargs["decoder_input_ids"] = decoder_input_ids
        if self.takes_cache:
            kwargs["use_cache"] = False  # one call scores: no key/value cache to build and return
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self.from_mask:  # decoder-only: the next item is scored at the last position, and only there
            last = {k: out[k][:, -1] for k in ("logits", "last_hidden_state") if out.get(k) is not None}
            return last or out
        return out
