"""A fine-tuned checkpoint's real data for the benchmark: inputs, evaluation, validation, calibration.

``real_data_setup(data, ckpt, eval_batch)`` returns what ``graphopt.bench`` needs
to judge variants on the data the model was fine-tuned for (``graphopt demo`` and
``graphopt bench CHECKPOINT --data ...`` both use it; other data than the
checkpoint recorded, by fingerprint, is refused):

- ``zoo``: the checkpoint's model whose ``make_inputs`` draws real user histories
  (sequence models) or real test ratings (CTR models), so timing and calibration
  see real inputs;
- ``eval``: HR@10/NDCG@10 on the test users (AUC/logloss on the test ratings), the
  metrics the report shows and "best" is judged on;
- ``validation`` (sequence models): the same metrics on the validation targets
  (each user's second-to-last item), what the int8 accuracy guard holds; the
  test targets are never shown to it;
- ``calibration``: 16 batches (2 with ``quick``) of those inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from graphopt.passlib.calibration import DEFAULT_CALIBRATION_BATCHES
from graphopt.rec.data import MovieLens, encode_histories, evaluate_ranking
from graphopt.rec.data.ctr import ClickData
from graphopt.rec.finetune import Checkpoint

__all__ = ["real_data_setup", "real_inputs"]


def real_inputs(ckpt: Checkpoint, histories: list[list[int]]) -> Any:
    """``make_inputs(batch, seq, seed)`` drawing real user histories."""

    def make(batch: int = 4, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, len(histories), (batch,), generator=g).tolist()
        ids, mask = encode_histories([histories[r] for r in rows], seq or int(ckpt.model_config["seq"]), ckpt.append_mask)
        return {"input_ids": ids, "attention_mask": mask}

    return make


def real_data_setup(data: MovieLens | ClickData, ckpt: Checkpoint, eval_batch: int, *,
                    eval_users: int | None = None, quick: bool = False) -> dict[str, Any]:
    """``zoo``, ``eval``, ``validation`` (sequence models), ``calibration``, ``seq`` (None for
    CTR models), ``count`` and ``what`` (a line saying what is evaluated); see the module doc.
    ``data`` other than the checkpoint's training data (its recorded fingerprint) is refused."""
    ckpt.check_data(data)
    if isinstance(data, ClickData):
        return _click_setup(data, ckpt, eval_batch, eval_users, quick)
    return _sequence_setup(data, ckpt, eval_batch, eval_users, quick)


def _sequence_setup(data: MovieLens, ckpt: Checkpoint, eval_batch: int, eval_users: int | None,
                    quick: bool) -> dict[str, Any]:
    split = data.leave_one_out()
    seq_len = int(ckpt.model_config["seq"])
    users = eval_users or (256 if quick else None)

    def on(cases: Any, per_user: bool) -> Any:
        def evaluate(fn: Any) -> dict[str, Any]:
            metrics = evaluate_ranking(fn, cases, split.num_items, seq_len=seq_len, append_mask=ckpt.append_mask,
                                       batch_size=eval_batch, fixed_batch=True, per_user=per_user)
            return {k: v for k, v in metrics.items() if k != "users"}
        return evaluate

    cases = split.test.subset(users)
    evaluate, validate = on(cases, True), on(split.valid.subset(users), False)

    zoo = ckpt.zoo_model(batch=max(2, eval_batch))  # capture needs an example of 2+ rows to keep the batch dynamic
    zoo.make_inputs = real_inputs(ckpt, split.test.histories)
    calibration = [tuple(zoo.make_inputs(batch=eval_batch, seed=2000 + i).values())
                   for i in range(2 if quick else DEFAULT_CALIBRATION_BATCHES)]
    return {"zoo": zoo, "eval": evaluate, "validation": validate, "calibration": calibration, "seq": seq_len,
            "count": len(cases), "what": f"HR@10/NDCG@10 on {len(cases)} test users"}


def _click_setup(data: ClickData, ckpt: Checkpoint, eval_batch: int, eval_users: int | None,
                 quick: bool) -> dict[str, Any]:
    """AUC/logloss on whole batches of ``eval_batch`` test ratings (runtimes with a static batch)."""
    from graphopt.bench import ClickEvalData

    objective = ckpt.objective
    split = data.split(seed=0)
    encoded = {part: objective.encode(split, part, ckpt.model_config)  # type: ignore[attr-defined]
               for part in ("train", "valid", "test")}

    def whole_batches(part: str) -> ClickEvalData:
        rows = encoded[part]
        n = len(rows) if eval_users is None else min(len(rows), eval_users)
        n = max(eval_batch, n - n % eval_batch)
        names = list(rows.inputs)
        batches = [tuple(rows.inputs[k][i:i + eval_batch] for k in names) for i in range(0, n, eval_batch)]
        what = "validation" if part == "valid" else part
        return ClickEvalData(batches, rows.clicks[:len(batches) * eval_batch], name=f"{data.name} {what} ratings")

    def drawn(part: str) -> Any:
        rows = encoded[part]

        def make(batch: int = 4, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
            pick = torch.randint(0, len(rows), (batch,), generator=torch.Generator().manual_seed(seed))
            return {k: v[pick] for k, v in rows.inputs.items()}
        return make

    eval_data = whole_batches("test")
    zoo = ckpt.zoo_model(batch=max(2, eval_batch))  # capture needs an example of 2+ rows to keep the batch dynamic
    zoo.make_inputs = drawn("test")  # timing and top-k drift on test rows' features
    from_train = drawn("train")  # calibration: rows the model learned from, apart from the guard's and the test's
    calibration = [tuple(from_train(batch=eval_batch, seed=2000 + i).values())
                   for i in range(2 if quick else DEFAULT_CALIBRATION_BATCHES)]
    count = len(eval_data.labels)
    return {"zoo": zoo, "eval": eval_data, "validation": whole_batches("valid"), "calibration": calibration,
            "seq": None, "count": count, "what": f"AUC/logloss on {count} test ratings"}
