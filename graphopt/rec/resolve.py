"""Resolve what a user names on the command line into a Program.

MODEL is a zoo name (``bert4rec:base``), a saved Program (``.pt2`` file or a
directory holding ``program.pt2``), a fine-tuned checkpoint folder
(``graphopt-checkpoint.json`` + ``model.safetensors``, from ``graphopt
finetune``), or a local Hugging Face model directory (``config.json`` +
weights; loaded offline).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from graphopt.errors import ModelNotFoundError, first_line
from graphopt.ir.program import Program

__all__ = ["load_program", "load_program_and_inputs", "named_inputs", "capture_hf_directory"]

#: ``(batch, seq, seed) -> inputs in the Program's order``
InputMaker = Callable[[int, "int | None", int], tuple[torch.Tensor, ...]]


def named_inputs(make_inputs: Callable[..., dict[str, torch.Tensor]], names: Sequence[str]) -> InputMaker:
    """``make_inputs(batch=, seq=, seed=) -> {name: tensor}`` (a zoo model's, a checkpoint's) as an
    :data:`InputMaker`."""

    def make(batch: int, seq: int | None, seed: int) -> tuple[torch.Tensor, ...]:
        made = make_inputs(batch=batch, seq=seq, seed=seed)
        return tuple(made[n] for n in names)

    return make


def capture_hf_directory(path: Path, batch: int = 4, seq: int = 16) -> Program:
    """Capture a local transformers model folder (no network) at batch/seq."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    cls_name = archs[0] if archs and hasattr(transformers, archs[0]) else "AutoModel"
    cls = getattr(transformers, cls_name)
    try:
        model = cls.from_pretrained(str(path), attn_implementation="sdpa").eval()
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load Hugging Face model from {path}: {first_line(e, with_type=False)}") from None
    vocab = int(getattr(model.config, "vocab_size", 100))
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    if getattr(model.config, "is_encoder_decoder", False):  # T5-style: one decoder step from the start token
        start = getattr(model.config, "decoder_start_token_id", None) or 0
        inputs["decoder_input_ids"] = torch.full((batch, 1), int(start), dtype=torch.long)
        dyn["decoder_input_ids"] = {0: "batch"}
    from graphopt.ir.capture import capture

    return capture(
        model,
        inputs,
        dynamic=dyn,
        name=path.resolve().name if path.resolve().name not in ("model", "checkpoint") else
        f"{path.resolve().parent.name}/{path.resolve().name}",
        input_ranges={"input_ids": (1, vocab), "attention_mask": (1, 2), "decoder_input_ids": (0, vocab)},
        meta={"hf_directory": str(path), "architecture": cls_name},
    )


def load_program(spec: str) -> Program:
    """Zoo name, saved Program, or Hugging Face folder -> Program."""
    return load_program_and_inputs(spec)[0]


def load_program_and_inputs(spec: str) -> tuple[Program, InputMaker | None]:
    """:func:`load_program`, and for a zoo name or a fine-tuned checkpoint its own input maker:
    histories shaped like real ones (a length each, left-padded), where the Program's input specs
    draw full-length ones (every mask position 1): what calibration should read."""
    path = Path(spec)
    if path.exists():
        if path.is_file():
            return Program.load(path), None
        if (path / "program.pt2").is_file():
            return Program.load(path / "program.pt2"), None
        if (path / "graphopt-checkpoint.json").is_file():  # `graphopt finetune -o` output
            from graphopt.rec.finetune import load_checkpoint

            ckpt = load_checkpoint(path)
            program = ckpt.capture()
            return program, named_inputs(ckpt.make_inputs, program.input_names)
        if (path / "config.json").is_file():
            return capture_hf_directory(path), None
        raise ModelNotFoundError(
            f"{path} holds neither program.pt2, a graphopt checkpoint, nor a Hugging Face config.json; "
            "point at a saved Program or a model folder"
        )
    if os.sep in spec or spec.endswith(".pt2"):
        raise ModelNotFoundError(f"no such file or directory: {spec}")
    from graphopt.rec.zoo import load_model

    zoo = load_model(spec)
    program = zoo.capture()
    return program, named_inputs(zoo.make_inputs, program.input_names)
