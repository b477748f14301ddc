"""What the tuner optimizes and what it measures fidelity on.

:func:`resolve_model` turns MODEL (zoo name, saved Program, fine-tuned
checkpoint, Hugging Face folder, or a Program / ZooModel object) into a
:class:`TuneModel`: the Program plus an input maker shaped like real requests.
:func:`tune_data` builds the :class:`TuneData`: calibration batches for int8,
held-out screening batches (top-k overlap with eager) and, with ``--data
ml-100k``, an evaluator of HR@10/NDCG@10 on MovieLens-100K's leave-one-out
test users (the demo's protocol: seen items masked, all users). Calibration
and timing inputs then come from real training histories.

This is the application side (like ``bench`` and ``rec``): it may import the
recommender data code; the compiler side never imports it.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import GraphoptError, ModelNotFoundError
from graphopt.ir.program import Program
from graphopt.passlib.calibration import DEFAULT_CALIBRATION_BATCHES
from graphopt.rec.resolve import InputMaker, named_inputs

__all__ = ["TuneModel", "TuneData", "DataSpecError", "resolve_model", "tune_data", "load_calibration_file", "DATASETS"]

log = logging.getLogger(__name__)

#: names ``--data`` accepts
DATASETS = ("ml-100k",)

Evaluator = Callable[[Callable[..., Sequence[torch.Tensor]]], dict[str, Any]]  # metric -> float (+ optional "per_user")


class DataSpecError(ModelNotFoundError):
    """Evaluation or calibration data that does not fit the model (a usage error)."""


@dataclass
class TuneModel:
    """The Program to tune and how to make inputs for it."""

    program: Program
    name: str
    make_inputs: InputMaker
    config: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None  # zoo family (bert4rec, bert-cls, dlrm, ...) when known
    source: str = ""
    module: torch.nn.Module | None = None  # the original model, when known: eager's reference

    def reference(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        """Eager fp32 of the original model (as ``graphopt bench``'s baseline), else of the Program."""
        if self.module is None:
            gm = self.program.gm

            def program(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
                with torch.inference_mode():
                    out = gm(*inputs)
                return tuple(out) if isinstance(out, (tuple, list)) else (out,)

            return program
        from graphopt.bench.variants import SourceModule

        source = SourceModule(self.module.eval(), self.program.input_names)

        def original(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.inference_mode():
                return source(*inputs)

        return original


def _program_inputs(program: Program) -> InputMaker:
    return lambda batch, seq, seed: tuple(program.sample_inputs(batch=batch, seq=seq, seed=seed))


def resolve_model(model: Any) -> TuneModel:
    """MODEL as ``graphopt optimize`` accepts it, or a Program / ZooModel / Checkpoint object."""
    if isinstance(model, Program):
        return TuneModel(model, model.name, _program_inputs(model), dict(model.meta.get("config", {})),
                         _kind(model.meta.get("zoo")), model.name)
    if hasattr(model, "module") and hasattr(model, "make_inputs") and hasattr(model, "capture"):
        program = model.capture()
        return TuneModel(program, model.name, named_inputs(model.make_inputs, program.input_names), dict(model.config),
                         _kind(model.name), model.name, model.module)
    if not isinstance(model, (str, Path)):
        raise GraphoptError(f"tune takes a model name or path, a Program or a ZooModel, got {type(model).__name__}")
    spec = str(model)
    path = Path(spec)
    from graphopt.rec.finetune import is_checkpoint, load_checkpoint

    if path.is_dir() and is_checkpoint(path):
        ckpt = load_checkpoint(path)
        program = ckpt.capture()
        return TuneModel(program, program.name, named_inputs(ckpt.make_inputs, program.input_names),
                         dict(ckpt.model_config), ckpt.kind, spec, ckpt.model)
    if path.exists() or spec.endswith(".pt2") or "/" in spec:
        from graphopt.rec.resolve import load_program

        program = load_program(spec)
        return TuneModel(program, program.name, _program_inputs(program), dict(program.meta.get("config", {})),
                         _kind(program.meta.get("zoo")), spec)
    from graphopt.rec.zoo import load_model

    zoo = load_model(spec)
    program = zoo.capture()
    return TuneModel(program, zoo.name, named_inputs(zoo.make_inputs, program.input_names), dict(zoo.config),
                     _kind(zoo.name), spec, zoo.module)


def _kind(name: Any) -> str | None:
    if not name:
        return None
    return str(name).split(":", 1)[0].split("@", 1)[0] or None


# ------------------------------------------------------------------ data
class _RankingEval:
    """HR@10/NDCG@10 of a callable on leave-one-out cases (the demo's protocol: seen items masked,
    fixed batches), scored batch by batch. The scores of the last callable are kept, so the full
    evaluation after a screen on the first users only scores the users not yet scored."""

    def __init__(self, cases: Any, num_items: int, seq_len: int, append_mask: int | None, batch: int):
        from graphopt.rec.data import encode_histories

        self.cases, self.num_items, self.batch = cases, num_items, batch
        self.ids, self.mask = encode_histories(cases.histories, seq_len, append_mask)
        self._fn: weakref.ref | None = None
        self._parts: list[torch.Tensor] = []

    def _scores(self, fn: Callable[..., Any], users: int) -> torch.Tensor:
        from graphopt.rec.data import item_scores

        if self._fn is None or self._fn() is not fn:
            self._fn, self._parts = weakref.ref(fn), []
        done = sum(len(p) for p in self._parts)
        while done < users:
            stop = min(done + self.batch, len(self.cases))
            ids, mask = self.ids[done:stop], self.mask[done:stop]
            rows = stop - done
            if rows < self.batch:  # runtimes with a static batch get full batches
                reps = math.ceil(self.batch / rows)
                ids, mask = ids.repeat(reps, 1)[: self.batch], mask.repeat(reps, 1)[: self.batch]
            out = fn(ids, mask)
            out = out[0] if isinstance(out, (tuple, list)) else out
            self._parts.append(item_scores(torch.as_tensor(out)[:rows], self.num_items))
            done = stop
        scores = torch.cat(self._parts)[:users]
        return torch.nan_to_num(scores, nan=-math.inf)  # a NaN score never ranks an item up

    def evaluate(self, fn: Callable[..., Any], users: int | None = None) -> dict[str, Any]:
        """HR@10 and NDCG@10 of the first ``users`` test users, and under ``"per_user"`` each
        user's hit and margin (:class:`graphopt.hits.UserHits`; the :class:`Judge` compares them with eager's)."""
        from graphopt.hits import user_hits
        from graphopt.metrics import hr_at_k, ndcg_at_k

        n = len(self.cases) if users is None else min(users, len(self.cases))
        scores = self._scores(fn, n)
        targets, seen = self.cases.targets[:n], self.cases.seen[:n]
        return {"hr@10": hr_at_k(scores, targets, 10, seen), "ndcg@10": ndcg_at_k(scores, targets, 10, seen),
                "per_user": user_hits(scores, targets, 10, seen)}


@dataclass
class TuneData:
    """Calibration batches, held-out screening batches and (optionally) an
    evaluator of ranking quality on evaluation data."""

    calibration: list[tuple[torch.Tensor, ...]]
    screen: list[tuple[torch.Tensor, ...]]
    evaluator: Evaluator | None = None
    subset_evaluator: Evaluator | None = None  # the same on fewer users (sensitivity)
    inputs: InputMaker | None = None  # timing inputs (real histories with --data)
    description: str = ""
    notice: str | None = None


def load_calibration_file(path: str | Path, names: Sequence[str], program: Program | None = None,
                          ) -> list[tuple[torch.Tensor, ...]]:
    """A ``torch.save``d list of batches (each a dict name -> tensor or a tuple in
    input order), or one dict of tensors; read with ``weights_only=True``. With
    ``program``, each batch is checked against its inputs as a runner would (dtype,
    rank, static dims, rows in every input and the same batch size across them,
    dims within the exported ranges, finite floats, ids within the embedding
    tables' rows): one line naming the batch and input, never a torch error later."""
    p = Path(path)
    if not p.is_file():
        raise DataSpecError(f"--calib {path}: no such file; save a list of input batches with torch.save")
    try:
        obj = torch.load(p, weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise DataSpecError(f"--calib {path}: not a torch.save file of torch tensors ({type(e).__name__}); save a list of "
                            "input batches (dicts or tuples of torch tensors, not numpy arrays) with torch.save") from None
    batches = [obj] if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple)) else None
    if batches == []:
        raise DataSpecError(f"--calib {path}: the list of batches is empty; save at least one input batch")
    if not batches:
        raise DataSpecError(f"--calib {path}: expected a list of batches (dicts of tensors or tuples), got {type(obj).__name__}")
    out = []
    contract: tuple[Any, Any] | None = None
    for i, b in enumerate(batches):
        if isinstance(b, dict):
            missing = [n for n in names if n not in b]
            if missing:
                raise DataSpecError(f"--calib {path}: batch {i} lacks input '{missing[0]}' (inputs: {', '.join(names)})")
            b = tuple(b[n] for n in names)
        if not isinstance(b, (list, tuple)) or len(b) != len(names) or not all(isinstance(t, torch.Tensor) for t in b):
            raise DataSpecError(f"--calib {path}: batch {i} is not {len(names)} tensors ({', '.join(names)})")
        if program is not None:
            if contract is None:
                from graphopt.runtime.contract import dim_ranges
                from graphopt.runtime.index_ranges import index_ranges

                contract = (dim_ranges(program), index_ranges(program))
            _check_batch(program, tuple(b), contract, f"--calib {path}: batch {i}")
        out.append(tuple(b))
    return out


def _check_batch(program: Program, batch: tuple[torch.Tensor, ...], contract: tuple[Any, Any], where: str) -> None:
    from graphopt.errors import RunnerError
    from graphopt.ir.program import check_inputs
    from graphopt.runtime.contract import check_contract

    for spec, value in zip(program.inputs, batch):
        if value.numel() == 0:
            raise DataSpecError(f"{where}: input '{spec.name}' is empty (shape {list(value.shape)}); "
                                "save batches of at least one row each")
    try:
        check_inputs(program.inputs, batch, "calib")
        check_contract(program.inputs, batch, contract[0], contract[1], "calib")
    except RunnerError as e:
        raise DataSpecError(f"{where}: {str(e).split(' | ', 1)[-1]}") from None


def _movielens_eval(tm: TuneModel, eval_batch: int, seed: int) -> tuple[TuneData, Any]:
    from graphopt.rec.data import encode_histories, load_movielens
    from graphopt.rec.finetune import get_objective

    meta = tm.program.meta.get("eval") or {}
    if meta:
        seq_len, append_mask, items = int(meta["seq_len"]), meta.get("append_mask"), int(meta["num_items"])
    elif tm.kind and tm.config.get("items") and tm.config.get("seq"):
        try:
            objective = get_objective(tm.kind)
        except GraphoptError:
            raise DataSpecError(
                f"--data ml-100k: {tm.name} is not an item-sequence model; use --metric topk-overlap"
            ) from None
        seq_len, append_mask, items = int(tm.config["seq"]), objective.append_mask(tm.config), int(tm.config["items"])
    else:
        raise DataSpecError(
            f"--data ml-100k: {tm.name} does not say how it reads MovieLens histories; tune a fine-tuned "
            "checkpoint (`graphopt finetune`) or use --metric topk-overlap"
        )
    if tm.program.input_names != ["input_ids", "attention_mask"]:
        raise DataSpecError(f"--data ml-100k: {tm.name} takes {', '.join(tm.program.input_names)}, not item "
                            "histories (input_ids, attention_mask); use --metric topk-overlap")
    data = load_movielens()
    from graphopt.rec.finetune.checkpoint import check_same_data  # a checkpoint scored on its own data only

    check_same_data(tm.program.meta.get("data") or {}, data, tm.source or tm.name, tm.name)
    if items != data.num_items:
        raise DataSpecError(
            f"--data ml-100k: {tm.name} scores {items} items but {data.name} has {data.num_items}; "
            "fine-tune it on MovieLens (`graphopt finetune MODEL --data ml-100k`) or use --metric topk-overlap"
        )
    split = data.leave_one_out()

    def histories_inputs(pool: list[list[int]]) -> InputMaker:
        def make(batch: int, seq: int | None, s: int) -> tuple[torch.Tensor, ...]:
            g = torch.Generator().manual_seed(s)
            rows = torch.randint(0, len(pool), (batch,), generator=g).tolist()
            return encode_histories([pool[r] for r in rows], seq or seq_len, append_mask)

        return make

    ranking = _RankingEval(split.test, split.num_items, seq_len, append_mask, eval_batch)

    train = [h for h in split.train if h]
    calib_inputs = histories_inputs(train)
    calibration = [calib_inputs(eval_batch, None, seed + 2000 + i) for i in range(DEFAULT_CALIBRATION_BATCHES)]
    screen_inputs = histories_inputs(split.test.histories)
    screen = [screen_inputs(eval_batch, None, seed + 3000 + i) for i in range(4)]
    desc = (f"{data.name} from {data.source}: HR@10/NDCG@10 on {len(split.test)} leave-one-out test users "
            f"(seen items masked, batch {eval_batch}); calibration on training histories")
    subset = min(256, len(split.test))
    td = TuneData(calibration, screen, ranking.evaluate, lambda fn: ranking.evaluate(fn, subset),
                  histories_inputs(split.test.histories), desc, data.notice)
    return td, data


def tune_data(
    tm: TuneModel,
    *,
    data: str | None = None,
    calib: str | Path | None = None,
    eval_data: Evaluator | None = None,
    batch: int = 32,
    seed: int = 0,
) -> TuneData:
    """Calibration, screening and evaluation data for ``tm``.

    ``data``: ``"ml-100k"`` (ranking quality on MovieLens-100K). ``calib``: a
    file of calibration batches (see :func:`load_calibration_file`); its last
    quarter is held out as screening batches. ``eval_data``: a callable
    ``evaluate(fn) -> {"ndcg@10": .., "hr@10": ..}`` (Python API).
    """
    if data is not None and data not in DATASETS:
        raise DataSpecError(f"--data {data!r}: unknown data set; one of {', '.join(DATASETS)}")
    seq = tm.config.get("seq") if "seq" in tm.program.dynamic_labels() else None
    screen_batch = max(batch, 16)
    td: TuneData
    if data == "ml-100k":
        td, _ = _movielens_eval(tm, batch, seed)
    else:
        calibration = [tm.make_inputs(batch, seq, seed + 2000 + i) for i in range(DEFAULT_CALIBRATION_BATCHES)]
        screen = [tm.make_inputs(screen_batch, seq, seed + 3000 + i) for i in range(4)]
        td = TuneData(calibration, screen, description=f"top-10 overlap with eager on {len(screen)} held-out "
                      f"batches of {screen_batch} seeded inputs")
    if eval_data is not None:
        td.evaluator = td.subset_evaluator = eval_data
        td.description = "ranking quality from the given eval_data"
    if calib is not None:
        batches = load_calibration_file(calib, tm.program.input_names, tm.program)
        held = max(1, len(batches) // 4) if len(batches) >= 2 else 0
        td.calibration = batches[: len(batches) - held] if held else batches
        if held and td.evaluator is None:
            td.screen = batches[len(batches) - held:]
            td.description = f"top-10 overlap with eager on the last {held} batches of {calib} (held out of calibration)"
    return td
