"""Resolve what a user names on the command line into a Program.

MODEL is a zoo name (``bert4rec:base``), a saved Program (``.pt2`` file or a
directory holding ``program.pt2``), a fine-tuned checkpoint folder
(``graphopt-checkpoint.json`` + ``model.safetensors``, from ``graphopt
finetune``), or a local Hugging Face model directory (``config.json`` +
weights; loaded offline).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from graphopt.errors import ArtifactError, ModelNotFoundError, first_line
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


def _hf_config(path: Path) -> dict:
    """``path/config.json`` as a dict, or a one-line ModelNotFoundError saying what is wrong with it."""
    where = path / "config.json"
    try:
        config = json.loads(where.read_text())
    except ValueError as e:  # not JSON, not UTF-8
        raise ModelNotFoundError(f"{where} is not valid JSON ({first_line(e, with_type=False, limit=120)}); "
                                 "fix it or re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{where} holds a JSON {type(config).__name__}, not an object; a Hugging Face "
                                 "config.json is one object (re-save the model with save_pretrained)")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ModelNotFoundError(f"{where}: \"architectures\" must be a list of transformers class names "
                                 f"(e.g. [\"GPT2LMHeadModel\"]), got {json.dumps(archs)[:80]}")
    return config


def _hf_class(path: Path, config: dict) -> tuple[str, type]:
    """The transformers class config.json's first architecture names (AutoModel when it names none);
    one transformers does not have is refused: AutoModel would drop the model's head."""
    import transformers

    archs = config.get("architectures") or []
    if not archs:
        return "AutoModel", transformers.AutoModel
    name = archs[0]
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelNotFoundError(
            f"{path / 'config.json'} names architecture {name!r}, which transformers {transformers.__version__} "
            "does not have; install a transformers that has it, or set \"architectures\" to a model class it has")
    return name, cls


#: a row of transformers' load report: ``key | MISMATCH | ... ckpt: torch.Size([..]) vs model:torch.Size([..])``
_MISMATCH = re.compile(r"^\s*(\S[^|]*?)\s*\|\s*MISMATCH\s*\|.*ckpt:\s*torch\.Size\((\[[^]]*\])\)\s*vs\s*"
                       r"model:\s*torch\.Size\((\[[^]]*\])\)")


@contextlib.contextmanager
def _held_transformers_log(records: list[logging.LogRecord]) -> Iterator[None]:
    """transformers' log records kept in ``records`` instead of printed (the caller prints them on success,
    a failure's one line names its cause), and no progress bar (``--debug``: both as transformers shows them)."""
    if os.environ.get("GRAPHOPT_DEBUG") == "1":
        yield
        return
    from transformers.utils import logging as hf_logging

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root, keep, bars = logging.getLogger("transformers"), Keep(), hf_logging.is_progress_bar_enabled()
    hf_logging.get_logger()  # transformers' own handler exists before it is switched off
    hf_logging.disable_default_handler()
    hf_logging.disable_progress_bar()
    root.addHandler(keep)
    try:
        yield
    finally:
        root.removeHandler(keep)
        hf_logging.enable_default_handler()
        if bars:
            hf_logging.enable_progress_bar()


def capture_hf_directory(path: Path, batch: int = 4, seq: int = 16) -> Program:
    """Capture a local transformers model folder (no network) at batch/seq."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors import SafetensorError

    cls_name, cls = _hf_class(path, _hf_config(path))
    report: list[logging.LogRecord] = []
    try:
        with _held_transformers_log(report):
            model = cls.from_pretrained(str(path), attn_implementation="sdpa").eval()
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load Hugging Face model from {path}: {first_line(e, with_type=False)}") from None
    except (RuntimeError, SafetensorError, KeyError, TypeError, EOFError) as e:  # damaged or mismatched weights
        cause = first_line(e, with_type=True, limit=160)
        if "ignore_mismatched_sizes" in cause:  # which tensor: the first row of transformers' load report
            rows = [_MISMATCH.search(line) for r in report for line in r.getMessage().splitlines()]
            row = next((m for m in rows if m), None)
            cause = (f"{row[1]} is {row[2]} in the file, {row[3]} in config.json" if row else
                     "tensor sizes differ from config.json")
        raise ModelNotFoundError(f"the weights in {path} do not load into the {cls_name} its config.json describes "
                                 f"({cause}); re-save the model with save_pretrained") from None
    for record in report:  # loaded: transformers' warnings (weights newly initialized, ...) as it prints them
        logging.getLogger(record.name).handle(record)
    vocab = int(getattr(model.config, "vocab_size", 100))
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    ranges = {"input_ids": (1, vocab), "attention_mask": (1, 2)}
    if getattr(model.config, "is_encoder_decoder", False):  # T5-style: one decoder step from the start token
        start = int(getattr(model.config, "decoder_start_token_id", None) or 0)
        inputs["decoder_input_ids"] = torch.full((batch, 1), start, dtype=torch.long)
        dyn["decoder_input_ids"] = {0: "batch"}
        ranges["decoder_input_ids"] = (start, start + 1)  # calibration and bench feed what serving feeds
    from graphopt.ir.capture import capture
    from graphopt.rec.hf_folder import FolderModel

    return capture(
        FolderModel(model).eval(),  # positions from the mask (decoder-only), the position table's bound
        inputs,
        dynamic=dyn,
        name=path.resolve().name if path.resolve().name not in ("model", "checkpoint") else
        f"{path.resolve().parent.name}/{path.resolve().name}",
        input_ranges=ranges,
        meta={"hf_directory": str(path), "architecture": cls_name},
    )


def _other_file(path: Path) -> str | None:
    """What a file that is no saved Program is, when graphopt can tell (a zip's entry names), as one line."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = {n.split("/", 1)[-1] for n in z.namelist()}
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    use = ("give a zoo name (`graphopt models`), a saved Program (`graphopt optimize -o` writes OUT/program.pt2) "
           "or a Hugging Face model folder")
    if any(n.startswith("code/") for n in names) and "data.pkl" in names:
        return (f"{path} is a TorchScript module (torch.jit.save), not a saved Program; run a lowered artifact "
                f"with `graphopt run`, or {use}")
    if "data.pkl" in names and "archive_format" not in names:
        return (f"{path} is a torch.save file (a state dict or tensors), not a saved Program; load the weights "
                f"into their model and capture it (graphopt.capture), or {use}")
    return None


def load_program(spec: str) -> Program:
    """Zoo name, saved Program, or Hugging Face folder -> Program."""
    return load_program_and_inputs(spec)[0]


def load_program_and_inputs(spec: str) -> tuple[Program, InputMaker | None]:
    """:func:`load_program`, and for a zoo name or a fine-tuned checkpoint its own input maker:
    histories shaped like real ones (a length each, left-padded), where the Program's input specs
    draw full-length ones (every mask position 1): what calibration should read."""
    path = Path(spec)
    if path.exists():
        if path.is_file() and path.suffix == ".py":  # was: "not a readable torch.export archive; re-create it"
            raise ModelNotFoundError(
                f"{path} is a Python file, not a MODEL; capture the model in it with graphopt.capture(model, "
                "example_inputs), save the Program (program.save(\"m.pt2\")) and pass m.pt2")
        if path.is_file():
            try:
                return Program.load(path), None
            except ArtifactError:
                what = _other_file(path)  # a TorchScript module or a state dict: say so, and what to give
                if what:
                    raise ModelNotFoundError(what) from None
                raise
        if (path / "manifest.json").is_file():  # a lowered artifact (OUT/<runtime>/)
            source = path.parent / "program.pt2"
            source_text = str(source) if source.is_file() else "the `optimize -o` folder's program.pt2"
            raise ModelNotFoundError(f"{path} is a lowered artifact, not a model; run it with `graphopt run {path} "
                                     f"--random-inputs`, or point at {source_text}, the Program it was lowered from")
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
