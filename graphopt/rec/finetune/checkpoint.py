"""Fine-tuned checkpoints: ``model.safetensors`` + ``graphopt-checkpoint.json`` in a
folder that ``graphopt optimize ckpt/`` (``graphopt.rec.resolve.load_program``)
and :func:`load_checkpoint` read back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.errors import ArtifactError, first_line
from graphopt.outputs import atomic_directory, usual_mode
from graphopt.rec.finetune.loop import FinetuneResult
from graphopt.rec.finetune.objectives import Objective, get_objective
from graphopt.runtime.artifact import sha256_file

__all__ = ["Checkpoint", "CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "WEIGHTS_FILE", "is_checkpoint",
           "save_checkpoint", "load_checkpoint", "check_same_data"]

CHECKPOINT_FILE = "graphopt-checkpoint.json"
CHECKPOINT_FORMAT = "graphopt.checkpoint/1"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Checkpoint:
    """A loaded fine-tuned model and its metadata."""

    path: Path
    model: nn.Module
    kind: str
    model_config: dict[str, Any]
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.meta.get("model", self.kind))

    @property
    def objective(self) -> Objective:
        return get_objective(self.kind)

    @property
    def append_mask(self) -> int | None:
        return self.objective.append_mask(self.model_config)

    def check_data(self, data: Any) -> None:
        """Refuse ``data`` (MovieLens or ClickData) other than the data this checkpoint was fine-tuned on."""
        check_same_data(self.meta.get("data") or {}, data, str(self.path), self.name)

    def make_inputs(self, batch: int = 4, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded random inputs shaped like real ones (item histories: left padding)."""
        return self.objective.example_inputs(self.model_config, batch, seq, seed)

    def zoo_model(self, batch: int = 4) -> Any:
        """As a :class:`graphopt.models.ZooModel`, ready to ``capture()``."""
        from graphopt.rec.zoo import ZooModel

        zoo = ZooModel(
            name=f"{self.name}@{self.meta.get('data', {}).get('name', 'finetuned')}",
            module=self.model,
            config=self.model_config,
            make_inputs=self.make_inputs,
            dynamic=self.objective.dynamic(),
            input_ranges=self.objective.input_ranges(self.model_config),
            batch=batch,
            seq=self.model_config.get("seq"),
        )
        return zoo

    def capture(self, batch: int = 4) -> Any:
        """The fine-tuned model as a Program; ``meta`` carries what evaluation needs."""
        from graphopt.ir.capture import capture

        zoo = self.zoo_model(batch)
        return capture(
            self.model,
            zoo.example_inputs,
            dynamic=zoo.dynamic,
            name=zoo.name,
            input_ranges=zoo.input_ranges,
            meta={"zoo": self.name, "config": self.model_config, "checkpoint": str(self.path),
                  "eval": self.meta.get("eval", {}), "data": self.meta.get("data", {}),
                  "metrics": self.meta.get("metrics", {})},
        )


def check_same_data(recorded: dict[str, Any], data: Any, what: str, model: str = "MODEL") -> None:
    """Refuse to judge ``what`` (a checkpoint fine-tuned on ``recorded``, its ``data`` metadata) on other
    ``data``: a model scored on data it was not trained on (or whose test users it trained on) gives
    numbers that mean nothing. Metadata without a fingerprint is not checked."""
    saved = recorded.get("fingerprint")
    if not saved or saved == data.fingerprint():
        return
    synthetic = recorded.get("synthetic")
    trained = f"{recorded.get('name', '?')} from {recorded.get('source', '?')}"
    hint = "synthetic" if synthetic else str(recorded.get("source", "ITS_DATA"))
    raise ArtifactError(
        f"{what} was fine-tuned on {trained} (fingerprint {saved}), but --data gives {data.name} from {data.source} "
        f"(fingerprint {data.fingerprint()}); pass --data {hint}, its training data, or fine-tune on this data: "
        f"`graphopt finetune {model} --data ... -o NEW_DIR`")


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CHECKPOINT_FILE).is_file()


def save_checkpoint(result: FinetuneResult, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``model.safetensors`` + ``graphopt-checkpoint.json`` atomically."""
    from safetensors.torch import save_model

    meta = {
        "format": CHECKPOINT_FORMAT,
        "model": result.spec,
        "kind": result.kind,
        "config": result.model_config,
        "eval": {"seq_len": result.seq_len, "append_mask": result.append_mask,
                 "num_items": int(result.model_config.get("items", 0)), "k": 10},
        "data": result.data,
        "metrics": {"valid": result.valid, "test": result.test, "popularity": result.popularity},
        "training": {**asdict(result.train_config), "steps": result.steps, "epochs_run": result.epochs,
                     "wall_s": round(result.wall_s, 1), "precision": result.precision,
                     "device": result.device, "stopped": result.stopped},
        "history": result.history,
        "versions": {"torch": torch.__version__},
    }
    with atomic_directory(out_dir, force=force) as tmp:
        save_model(result.model, str(tmp / WEIGHTS_FILE))
        usual_mode(tmp / WEIGHTS_FILE)  # safetensors writes 0600 whatever the umask: readable as any file is
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Rebuild the architecture from the config and load the safetensors weights."""
    from safetensors.torch import load_model

    path = Path(path)
    marker = path / CHECKPOINT_FILE
    if not marker.is_file():
        raise ArtifactError(f"{path} is not a graphopt checkpoint (no {CHECKPOINT_FILE}); write one with `graphopt finetune -o`")
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{marker} is not valid JSON ({e.msg}); re-create the checkpoint") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{marker} has format {meta.get('format')!r}, this graphopt reads {CHECKPOINT_FORMAT!r}")
    if not isinstance(meta.get("kind"), str) or not isinstance(meta.get("config"), dict):
        raise ArtifactError(f"{marker} lacks its model kind or config; re-create the checkpoint")
    kind, cfg = meta["kind"], meta["config"]
    model = get_objective(kind).build(cfg, pretrained=False)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{path} has no {WEIGHTS_FILE}; re-create the checkpoint with `graphopt finetune -o`")
    saved = meta.get("weights_sha256")  # absent in checkpoints written before it was recorded
    if saved and sha256_file(weights) != saved:
        raise ArtifactError(f"{weights} is damaged: it does not match the checksum saved with it; re-create the "
                            "checkpoint with `graphopt finetune --fresh`")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"{weights} could not be read ({first_line(e, with_type=False)}); re-create the checkpoint") from None
    if missing or unexpected:
        raise ArtifactError(
            f"{weights} does not match a {meta['model']} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            "re-create the checkpoint"
        )
    return Checkpoint(path=path, model=model.eval(), kind=kind, model_config=cfg, meta=meta)
