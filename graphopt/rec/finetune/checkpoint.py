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

__all__ = ["Checkpoint", "CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "WEIGHTS_FILE", "IDS_FILE", "is_checkpoint",
           "save_checkpoint", "load_checkpoint", "check_same_data"]

CHECKPOINT_FILE = "graphopt-checkpoint.json"
CHECKPOINT_FORMAT = "graphopt.checkpoint/1"
WEIGHTS_FILE = "model.safetensors"
#: the raw id of every dense item (and user, for the click models): ``{"items": [...], "users": [...]}``
IDS_FILE = "ids.json"
FRESH = "re-run `graphopt finetune MODEL --data DATA -o DIR --fresh` to re-create it"


@dataclass
class Checkpoint:
    """A loaded fine-tuned model and its metadata."""

    path: Path
    model: nn.Module
    kind: str
    model_config: dict[str, Any]
    meta: dict[str, Any]
    #: raw id of dense item ``i`` is ``item_ids[i - 1]`` (None: a checkpoint written before ids were saved,
    #: or synthetic data: dense ids are the raw ones); ``user_ids`` likewise for the click models
    item_ids: list[str] | None = None
    user_ids: list[str] | None = None

    def item_index(self, raw: str | int) -> int:
        """The dense item id (model row / score column) of a raw item id from the user's data."""
        from graphopt.rec.data.events import normal_id

        key = normal_id(str(raw))
        if self.item_ids is None:
            return int(key)
        if not hasattr(self, "_item_index"):
            self._item_index = {r: i for i, r in enumerate(self.item_ids, 1)}
        if key not in self._item_index:
            raise ArtifactError(f"item {raw!r} is not in {self.path}'s training data; score only its items")
        return self._item_index[key]

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
    """Write ``model.safetensors`` + ``graphopt-checkpoint.json`` (+ ``ids.json``, the raw ids) atomically."""
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
        if result.ids:
            (tmp / IDS_FILE).write_text(json.dumps({"format": "graphopt.ids/1", **result.ids}) + "\n")
            meta["ids"] = {"file": IDS_FILE, "sha256": sha256_file(tmp / IDS_FILE), "renumbered": result.renumbered}
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{marker} is not valid JSON ({getattr(e, 'msg', 'not UTF-8')}); {FRESH}") from None
    kind, cfg = _validated(meta, marker)
    try:
        model = get_objective(kind).build(cfg, pretrained=False)
    except Exception as e:  # an edited config: wrong types or sizes torch refuses
        raise ArtifactError(f"{marker}: its config does not build a {kind} ({first_line(e, with_type=False)[:120]}); "
                            f"{FRESH}") from None
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
        raise ArtifactError(f"{weights} could not be read ({first_line(e, with_type=False)[:160]}); {FRESH}") from None
    if missing or unexpected:
        raise ArtifactError(
            f"{weights} does not match a {meta['model']} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            f"{FRESH}"
        )
    items, users = _ids(path, meta)
    return Checkpoint(path=path, model=model.eval(), kind=kind, model_config=cfg, meta=meta, item_ids=items,
                      user_ids=users)


def _validated(meta: Any, marker: Path) -> tuple[str, dict[str, Any]]:
    """``(kind, config)`` of a checkpoint's metadata, each field of the type graphopt wrote (hand edits refused)."""
    from graphopt.rec.finetune.objectives import model_kinds

    if not isinstance(meta, dict):
        raise ArtifactError(f"{marker} holds a JSON {type(meta).__name__}, not the object graphopt writes; {FRESH}")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{marker} has format {meta.get('format')!r}, this graphopt reads {CHECKPOINT_FORMAT!r}; "
                            f"{FRESH}")
    kind, cfg, spec = meta.get("kind"), meta.get("config"), meta.get("model")
    if not isinstance(kind, str) or not isinstance(cfg, dict) or not cfg or not isinstance(spec, str):
        raise ArtifactError(f"{marker} lacks its model kind or config (or its model name); {FRESH}")
    if kind not in model_kinds():
        raise ArtifactError(f"{marker} names model kind {kind[:40]!r}, not one of {', '.join(model_kinds())}; {FRESH}")
    if spec.partition(":")[0] != kind:
        raise ArtifactError(f"{marker} says kind {kind} but model {spec[:40]}: the file was edited; {FRESH}")
    bad = [k for k, v in cfg.items() if (isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0)
           or not isinstance(v, (int, float, str, list, dict, type(None)))]
    if "items" in cfg and (not isinstance(cfg["items"], int) or cfg["items"] < 1):
        bad.append("items")
    if bad:
        raise ArtifactError(f"{marker}: config {sorted(set(bad))[0]} = {cfg[sorted(set(bad))[0]]!r} is not a size "
                            f"graphopt writes; {FRESH}")
    for key, want in (("data", dict), ("metrics", dict), ("eval", dict), ("training", dict), ("history", list),
                      ("ids", dict)):
        if key in meta and not isinstance(meta[key], want):
            raise ArtifactError(f"{marker}: {key} is a JSON {type(meta[key]).__name__}, not the "
                                f"{'object' if want is dict else 'array'} graphopt writes; {FRESH}")
    return kind, cfg


def _ids(path: Path, meta: dict[str, Any]) -> tuple[list[str] | None, list[str] | None]:
    """The saved raw ids (items, users); (None, None) for a checkpoint written without them."""
    if "ids" not in meta:
        return None, None
    file = path / IDS_FILE
    if not file.is_file() or sha256_file(file) != meta["ids"].get("sha256"):
        raise ArtifactError(f"{file} is missing or does not match the checksum saved with it; {FRESH}")
    ids = json.loads(file.read_text())
    return ids.get("items"), ids.get("users")
