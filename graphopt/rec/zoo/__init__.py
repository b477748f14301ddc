"""Model zoo: small, deterministic recommenders with matching example inputs.

``load_model("bert4rec:tiny")`` builds the model from a config with seeded
random weights (no downloads). Every entry has a ``tiny`` config for unit
tests and a ``base`` config for benchmarks.

=============  ==============================================================
``bert-cls``   transformers BertForSequenceClassification, num_labels = items
``bert4rec``   transformers BertModel over item ids + tied item-scoring head
``gpt-rec``    transformers GPT2Model over item ids (causal) + tied item-scoring head
``t5-rec``     transformers T5ForConditionalGeneration: history in the encoder, one decoder step
``dlrm``       dense MLP (with BN) + EmbeddingBag tables + dot interaction
``two-tower``  user tower and item tower with a dot-product score
=============  ==============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt.errors import ModelNotFoundError, closest

__all__ = ["ZooModel", "load_model", "available_models", "register_model"]


@dataclass
class ZooModel:
    """A built model, its example inputs and how to make more of them."""

    name: str
    module: torch.nn.Module
    config: dict[str, Any]
    make_inputs: Callable[..., dict[str, torch.Tensor]]
    dynamic: dict[str, dict[int, str]]
    input_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    batch: int = 4
    seq: int | None = None

    @property
    def example_inputs(self) -> dict[str, torch.Tensor]:
        return self.make_inputs(batch=self.batch, seq=self.seq, seed=0)

    def capture(self, **kwargs: Any):  # -> Program
        from graphopt.ir.capture import capture

        return capture(
            self.module,
            self.example_inputs,
            dynamic=kwargs.pop("dynamic", self.dynamic),
            name=self.name,
            input_ranges=self.input_ranges,
            meta={"zoo": self.name, "config": self.config},
            **kwargs,
        )


# name -> {size -> builder(seed) -> ZooModel}
_MODELS: dict[str, dict[str, Callable[[int], ZooModel]]] = {}


def register_model(name: str, size: str, builder: Callable[[int], ZooModel]) -> None:
    _MODELS.setdefault(name, {})[size] = builder


_BUILTIN_MODULES = ("bert", "dlrm", "gpt", "t5", "text", "two_tower")
_builtins_loaded = False


def _load_builtin() -> None:
    """Import every zoo module once (each registers its models), whatever was imported before."""
    global _builtins_loaded
    if not _builtins_loaded:
        import importlib

        for module in _BUILTIN_MODULES:
            importlib.import_module(f"graphopt.rec.zoo.{module}")
        _builtins_loaded = True


def available_models() -> list[str]:
    _load_builtin()
    return [f"{n}:{s}" for n, sizes in sorted(_MODELS.items()) for s in sizes]


def load_model(spec: str, seed: int = 0) -> ZooModel:
    """Build ``name[:size]`` (size defaults to ``base``) with seeded weights."""
    _load_builtin()
    name, _, size = spec.partition(":")
    size = size or "base"
    if name not in _MODELS:
        raise ModelNotFoundError(
            f"unknown model '{name}'{closest(name, list(_MODELS))}; zoo models: "
            f"{', '.join(available_models())}, or pass a local Hugging Face folder or a .pt2 Program"
        )
    if size not in _MODELS[name]:
        raise ModelNotFoundError(
            f"model '{name}' has no size '{size}'; sizes: {', '.join(_MODELS[name])}"
        )
    return _MODELS[name][size](seed)
