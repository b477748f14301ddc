"""The fine-tuning loop: ``finetune("bert4rec:base", data)`` trains and returns a
:class:`FinetuneResult`.

Training: the output bias starts at log item popularity (so step 0 is the
popularity baseline), the item table at the training histories' factorised
co-occurrence (``item_init``, :mod:`.item_init`: a random table sat on the
popularity plateau for most of a 5-minute run on a CPU without bf16), AdamW (no
decay on biases/LayerNorm), linear warm-up then linear decay, gradient clipping,
bf16 autocast on CPUs with native bf16 (AMX) and fp16 autocast + GradScaler on
CUDA (autocast serves training and the per-epoch validation that early stopping
and the choice of the best weights follow; the validation and test metrics a run
records are measured afterwards on the fp32 weights it saves, what ``graphopt
bench``'s eager reference reproduces), early stopping on the objective's
validation metric (the best weights are kept; evaluations count towards the patience only once the best beats the
popularity baseline on validation, the plateau a fresh model starts on: a cold
``graphopt demo`` on 2026-12-03 stopped there after 5 evaluations at test HR@10
0.0456, popularity's 0.0498, where other runs of it reach 0.086-0.119). With
``max_minutes`` the schedule follows the share of the time budget used, so a run
always ends decayed: the budget is the stop and patience does not apply (the
best validation weights are still kept; a cold demo on 2026-12-04 stopped on
patience at 212 s of 300, its learning rate still at 30% of its peak, at test
HR@10 0.0488, where budget-length runs reached 0.112-0.120); results depend on
machine speed. With ``max_minutes=None`` a run is reproducible from its seed and
stops on patience. What differs per model kind (batches, loss, scores,
evaluation) is its :class:`~graphopt.rec.finetune.objectives.Objective`.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.errors import GraphoptError, ModelNotFoundError
from graphopt.rec.data import DataError, MovieLens
from graphopt.rec.data.ctr import ClickData
from graphopt.rec.finetune.objectives import get_objective, model_kinds
from graphopt.rec.finetune.precision import autocast, resolve_precision

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "parse_spec", "MAX_SKIPPED_STEPS"]

log = logging.getLogger(__name__)

MAX_SKIPPED_STEPS = 20  # non-finite updates skipped before a run counts as diverged


#: the item table's starts (``FinetuneConfig.item_init``; the first is the default)
ITEM_INITS = ("cooccurrence", "random")


@dataclass
class FinetuneConfig:
    """Training hyper-parameters; the defaults suit ``bert4rec:base`` on ML-100K."""

    epochs: int = 200
    max_minutes: float | None = 5.0
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # share of all steps
    clip: float = 1.0
    mask_prob: float = 0.4  # 0.2 sat at the popularity plateau for 25 epochs on ML-100K; 0.4 leaves it by ~5
    last_only_prob: float = 0.0  # samples that mask only the last item (0.25 kept it on the plateau)
    seq_len: int | None = None  # default: the model's
    patience: int = 5  # evaluations without a better validation metric (NDCG@10 for sequence models), once
    # the best beats popularity's; runs without a time budget only (with one, the budget is the stop)
    eval_every: int = 1  # epochs
    eval_users: int | None = None  # validation users per evaluation (None: all)
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch intra-op threads while training (None: leave as is)
    dropout: float | None = None  # override the model's dropout while training (None: keep 0.1)
    popularity_init: bool = True  # output bias starts at log item popularity
    item_init: str = "cooccurrence"  # cooccurrence | random: the item table's start (see .item_init)

    def check(self) -> None:
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise GraphoptError(f"precision '{self.precision}' is not one of auto, bf16, fp16, fp32")
        if self.item_init not in ITEM_INITS:
            raise GraphoptError(f"item_init '{self.item_init}' is not one of {', '.join(ITEM_INITS)}")
        for name in ("epochs", "batch_size", "patience", "eval_every"):
            if getattr(self, name) < 1:
                raise GraphoptError(f"finetune {name} must be >= 1, got {getattr(self, name)}")


@dataclass
class FinetuneResult:
    """The trained model (eval mode, CPU) and what happened."""

    model: nn.Module
    kind: str
    spec: str
    model_config: dict[str, Any]
    train_config: FinetuneConfig
    history: list[dict[str, float]] = field(default_factory=list)
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    popularity: dict[str, dict[str, float]] = field(default_factory=dict)
    steps: int = 0
    epochs: int = 0
    wall_s: float = 0.0
    precision: str = "fp32"
    device: str = "cpu"
    stopped: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)  # raw ids of the dense rows ("items", "users")
    renumbered: bool = False  # whether those differ from 1..N

    @property
    def seq_len(self) -> int:
        return int(self.model_config.get("seq") or 0)  # CTR models have no sequence length

    @property
    def append_mask(self) -> int | None:
        return get_objective(self.kind).append_mask(self.model_config)


def parse_spec(spec: str) -> tuple[str, str]:
    """``bert4rec:base`` -> (kind, size); the size defaults to base."""
    name, _, size = spec.partition(":")
    size = size or "base"
    if name not in model_kinds():
        if Path(spec).exists():  # a Hugging Face folder or a saved Program: graphopt trains zoo models only
            raise ModelNotFoundError(f"cannot fine-tune {spec}: graphopt fine-tunes zoo models only "
                                     f"({', '.join(model_kinds())}); a folder or saved Program can be optimized, "
                                     "benchmarked and tuned as it is")
        raise ModelNotFoundError(f"cannot fine-tune '{name}'; fine-tunable models: {', '.join(model_kinds())}")
    return name, size


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


class _Schedule:
    """Linear warm-up then linear decay to 0.

    Progress is the share of ``total`` steps done or, with a time budget, the
    share of the budget used, whichever is larger: a run cut short by its
    budget still ends with a decayed learning rate.
    """

    def __init__(self, total: int, warmup: float, budget_s: float | None = None):
        self.total = max(1, total)
        self.warmup = warmup
        self.budget_s = budget_s
        self.start = time.perf_counter()

    def progress(self, step: int) -> float:
        done = step / self.total
        if self.budget_s:
            done = max(done, (time.perf_counter() - self.start) / self.budget_s)
        return min(1.0, done)

    def __call__(self, step: int) -> float:
        p = self.progress(step)
        if self.warmup > 0 and p < self.warmup:
            return max(p, 1.0 / self.total) / self.warmup
        return max(0.0, (1.0 - p) / max(1e-9, 1.0 - self.warmup))


class _Progress:
    """A rich progress bar on stderr when interactive (share of steps or time budget); nothing otherwise."""

    def __init__(self, enabled: bool | None, label: str):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                console=Console(stderr=True), transient=True,
            )
            self.task = self.bar.add_task(label, total=1.0, info="")
            self.bar.start()

    def update(self, progress: float, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=progress, info=info)

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def finetune(
    spec: str,
    data: MovieLens | ClickData,
    config: FinetuneConfig | None = None,
    *,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Train ``spec`` (``bert4rec:base``, ``bert-cls:tiny``, ``bert4rec-text:base``) on ``data``
    (item sequences; :class:`~graphopt.rec.data.ctr.ClickData` for ``dlrm``/``two-tower``).

    ``on_epoch`` receives each epoch's record (epoch, step, loss, lr, valid
    ``valid_<metric>`` when evaluated, elapsed_s). Returns the best model by
    the objective's validation metric (NDCG@10 for sequence models),
    evaluated on the test split.
    """
    cfg = config or FinetuneConfig()
    cfg.check()
    kind, size = parse_spec(spec)
    objective = get_objective(kind)
    objective.check_spec(size, cfg.seq_len)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    precision = resolve_precision(cfg.precision, device)
    model_cfg = objective.config_for(size, data, cfg.seq_len)
    seq_len = int(model_cfg.get("seq") or 0)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = objective.build(model_cfg)
    objective.prepare(model, data)
    split = objective.split(data, model_cfg)
    if cfg.popularity_init:
        objective.init_bias(model, split)
    if cfg.item_init == "cooccurrence":
        objective.init_items(model, split)
    if cfg.dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):  # attention dropout too: SDPA reads .p
                module.p = cfg.dropout
    model.to(device)
    samples = objective.samples_per_epoch(split.train, seq_len)
    if samples == 0:
        raise DataError(f"{data.source}: no training samples: leave-one-out holds out each user's last 2 "
                        f"interactions, so training needs users with 4 or more ({data.num_users} users, "
                        f"{data.num_interactions} interactions); give more interactions per user")
    if cfg.batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise GraphoptError(f"{kind} trains BatchNorm layers, which need 2 or more rows a batch; pass --batch-size 2 "
                            "or more")
    steps_per_epoch = math.ceil(samples / cfg.batch_size)
    planned = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    optimizer = _optimizer(model, cfg)
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    schedule = _Schedule(planned, cfg.warmup, budget)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    result = FinetuneResult(model=model, kind=kind, spec=f"{kind}:{size}", model_config=model_cfg,
                            train_config=cfg, precision=precision, device=str(device), data=data.describe(),
                            ids={k: v for k, v in (("items", data.item_ids), ("users", data.user_ids)) if v
                                 and (k == "items" or isinstance(data, ClickData))},
                            renumbered=bool(getattr(data, "renumbered", False)))
    result.popularity = objective.baseline(split)
    log.info("fine-tuning %s on %s: %d steps/epoch, %s on %s", spec, data.name, steps_per_epoch, precision, device)

    select = objective.selection_metric
    floor = result.popularity.get("valid", {}).get(select)  # early stopping waits until this is beaten
    best_score, best_state, since_best = -math.inf, None, 0
    start = schedule.start = time.perf_counter()
    bar = _Progress(progress, f"fine-tune {spec}")
    step, epoch, skipped = 0, 0, 0
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        while epoch < cfg.epochs and not result.stopped:
            epoch += 1
            model.train()
            losses = []
            epoch_start = time.perf_counter()
            for batch in objective.batches(split.train, cfg, seq_len, model_cfg, rng):
                batch = tuple(t.to(device) for t in batch)
                with autocast(precision, device):
                    loss = objective.loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                    if torch.isfinite(norm):
                        optimizer.step()
                    else:  # a bf16 overflow: skip the update, as GradScaler does for fp16
                        skipped += 1
                        if skipped > MAX_SKIPPED_STEPS:
                            result.stopped = f"diverged: {skipped} steps with non-finite gradients (lower --lr)"
                            break
                scheduler.step()
                step += 1
                if torch.isfinite(loss):
                    losses.append(float(loss.detach()))
                bar.update(schedule.progress(step), f"epoch {epoch} step {step} loss {sum(losses) / max(1, len(losses)):.3f} "
                           f"best valid {select} {max(best_score, 0):.4f}")
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    result.stopped = f"max_steps={cfg.max_steps} reached"
                    break
                if budget is not None and time.perf_counter() - start > budget:
                    result.stopped = f"time budget of {cfg.max_minutes:g} min reached"
                    break
            record: dict[str, float] = {"epoch": epoch, "step": step, "loss": sum(losses) / max(1, len(losses)),
                                        "lr": scheduler.get_last_lr()[0], "train_s": time.perf_counter() - epoch_start}
            if epoch % cfg.eval_every == 0 or result.stopped or epoch == cfg.epochs:
                eval_start = time.perf_counter()
                metrics = objective.evaluate(model, split, "valid", seq_len, model_cfg, precision, device, cfg.eval_users)
                record["eval_s"] = time.perf_counter() - eval_start
                record.update({f"valid_{k}": v for k, v in metrics.items() if k != "users"})
                if metrics[select] > best_score:
                    best_score, since_best = metrics[select], 0
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                    result.valid = {k: v for k, v in metrics.items() if k != "users"}
                else:
                    since_best += 1
                    if (since_best >= cfg.patience and not result.stopped and budget is None
                            and (floor is None or best_score > floor)):
                        result.stopped = f"early stop: no better validation {select} in {cfg.patience} evaluations"
            elapsed = time.perf_counter() - start
            record["elapsed_s"] = elapsed
            result.history.append(record)
            log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
            valid = {k.removeprefix("valid_"): v for k, v in record.items() if k.startswith("valid_")}
            if valid:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in valid.items())
                bar.note(f"epoch {epoch}: loss {record['loss']:.4f}, valid {shown} ({elapsed:.0f}s)")
            if on_epoch is not None:
                on_epoch(record)
        if not result.stopped:
            result.stopped = f"{cfg.epochs} epochs done"
        bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        # the recorded metrics are the saved fp32 weights' (what bench's eager fp32 reference measures),
        # not the autocast ones that picked them: bf16 moved bert4rec:base's test HR@10 by 0.001 on ml-100k
        final = {part: objective.evaluate(model, split, part, seq_len, model_cfg, "fp32", device,
                                          cfg.eval_users if part == "valid" else None) for part in ("valid", "test")}
        result.valid, result.test = ({k: v for k, v in m.items() if k != "users"} for m in final.values())
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    model.eval().cpu()
    result.steps, result.epochs, result.wall_s = step, epoch, time.perf_counter() - start
    log.info("fine-tuned %s: valid %s, test %s (%s)", spec, result.valid, result.test, result.stopped)
    return result
