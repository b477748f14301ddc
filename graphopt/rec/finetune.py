"""Fine-tune the zoo recommenders on item sequences (MovieLens-100K).

``finetune("bert4rec:base", data)`` trains and returns a :class:`FinetuneResult`;
``save_checkpoint`` writes ``model.safetensors`` + ``graphopt-checkpoint.json``
into a folder that ``graphopt optimize ckpt/`` (``resolve.load_program``) and
``load_checkpoint`` read back.

Objectives:

=================  ===========================================================
``bert4rec``       masked-item (Cloze): random positions -> [mask], predict the
                   item at each over all items (optionally a share of samples
                   mask only the last position, as evaluation does)
``bert4rec-text``  the same, from pretrained MiniLM-L6 with the item table
                   initialised from item-title embeddings
``bert-cls``       next-item classification: history -> label of the next item
                   (``num_labels`` = items)
=================  ===========================================================

Training: the output bias starts at log item popularity (so step 0 is the
popularity baseline), AdamW (no decay on biases/LayerNorm), linear warm-up then
linear decay, gradient clipping, bf16 autocast on CPUs with native bf16 (AMX)
and fp16 autocast + GradScaler on CUDA, early stopping on validation NDCG@10
(the best weights are kept). With ``max_minutes`` the schedule follows the
share of the time budget used (so a run always ends decayed) and results
depend on machine speed; with ``max_minutes=None`` a run is reproducible from
its seed.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.errors import ArtifactError, GraphoptError, ModelNotFoundError, first_line
from graphopt.outputs import atomic_directory
from graphopt.rec.data import MovieLens, Split, encode_histories, evaluate_ranking, popularity_metrics

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "Checkpoint",
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "MODEL_KINDS",
    "build_model",
    "finetune",
    "save_checkpoint",
    "load_checkpoint",
    "is_checkpoint",
    "resolve_precision",
]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "graphopt-checkpoint.json"
CHECKPOINT_FORMAT = "graphopt.checkpoint/1"
WEIGHTS_FILE = "model.safetensors"
MODEL_KINDS = ("bert4rec", "bert-cls", "bert4rec-text")
MAX_SKIPPED_STEPS = 20  # non-finite updates skipped before a run counts as diverged


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
    patience: int = 5  # evaluations without a better validation NDCG@10
    eval_every: int = 1  # epochs
    eval_users: int | None = None  # validation users per evaluation (None: all)
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch intra-op threads while training (None: leave as is)
    dropout: float | None = None  # override the model's dropout while training (None: keep 0.1)
    popularity_init: bool = True  # output bias starts at log item popularity

    def check(self) -> None:
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise GraphoptError(f"precision '{self.precision}' is not one of auto, bf16, fp16, fp32")
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

    @property
    def seq_len(self) -> int:
        return int(self.model_config["seq"])

    @property
    def append_mask(self) -> int | None:
        return _append_mask(self.kind, self.model_config)


# ------------------------------------------------------------------- models
def _parse_spec(spec: str) -> tuple[str, str]:
    name, _, size = spec.partition(":")
    size = size or "base"
    if name not in MODEL_KINDS:
        raise ModelNotFoundError(f"cannot fine-tune '{name}'; fine-tunable models: {', '.join(MODEL_KINDS)}")
    return name, size


def _model_config(kind: str, size: str, num_items: int, seq_len: int | None) -> dict[str, Any]:
    if kind == "bert4rec-text":
        from graphopt.rec.zoo.text import SIZES as TEXT_SIZES
        from graphopt.rec.zoo.text import text_config

        if size not in TEXT_SIZES:
            raise ModelNotFoundError(f"model '{kind}' has no size '{size}'; sizes: {', '.join(TEXT_SIZES)}")
        return text_config(TEXT_SIZES[size]["layers"], num_items, seq_len or TEXT_SIZES[size]["seq"])
    from graphopt.rec.zoo.bert import SIZES

    if size not in SIZES:
        raise ModelNotFoundError(f"model '{kind}' has no size '{size}'; sizes: {', '.join(SIZES)}")
    cfg = dict(SIZES[size])
    cfg["items"] = num_items
    cfg["seq"] = seq_len or cfg["seq"]
    return cfg


def _append_mask(kind: str, cfg: dict[str, Any]) -> int | None:
    return None if kind == "bert-cls" else int(cfg["items"]) + 1


def build_model(kind: str, cfg: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
    """The architecture of ``kind`` for ``cfg`` (seed torch before calling).

    ``pretrained`` only matters for ``bert4rec-text`` (MiniLM encoder weights).
    """
    from graphopt.rec.zoo.bert import Bert4Rec, _bert_config

    if kind == "bert4rec":
        return Bert4Rec(cfg["items"], cfg)
    if kind == "bert4rec-text":
        from graphopt.rec.zoo.text import build_text_bert4rec

        return build_text_bert4rec(cfg, pretrained=pretrained)
    if kind == "bert-cls":
        from transformers import BertForSequenceClassification

        config = _bert_config(cfg, cfg["items"] + 2)
        config.num_labels = cfg["items"]
        config.problem_type = "single_label_classification"
        return BertForSequenceClassification(config)
    raise ModelNotFoundError(f"cannot build '{kind}'; fine-tunable models: {', '.join(MODEL_KINDS)}")


def _scores_fn(model: nn.Module, kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "bert-cls":
        return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits
    return lambda ids, mask: model(ids, mask)


# ---------------------------------------------------------------- precision
def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> fp16 on CUDA, bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise GraphoptError("fp16 training needs a CUDA device (CPU fp16 is slower than fp32); use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "fp16"
    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native_bf16 = False
    return "bf16" if native_bf16 else "fp32"


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------- batching
def _windows(seq: list[int], length: int, rng: random.Random) -> list[list[int]]:
    """The latest window plus random earlier ones, about one per ``length`` items."""
    if len(seq) <= length:
        return [seq]
    out = [seq[-length:]]
    for _ in range(math.ceil(len(seq) / length) - 1):
        end = rng.randint(length, len(seq) - 1)
        out.append(seq[end - length:end])
    return out


def _masked_batches(
    train: list[list[int]], cfg: FinetuneConfig, seq_len: int, mask_id: int, rng: random.Random
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    samples = [w for seq in train if len(seq) >= 2 for w in _windows(seq, seq_len, rng)]
    rng.shuffle(samples)
    for start in range(0, len(samples), cfg.batch_size):
        chunk = samples[start:start + cfg.batch_size]
        ids, attn = encode_histories(chunk, seq_len)
        labels = torch.full_like(ids, -100)
        for row, window in enumerate(chunk):
            first = seq_len - len(window)
            if rng.random() < cfg.last_only_prob:
                positions = [seq_len - 1]
            else:
                positions = [first + i for i in range(len(window)) if rng.random() < cfg.mask_prob]
                positions = positions or [first + rng.randrange(len(window))]
            for pos in positions:
                labels[row, pos] = ids[row, pos]
                ids[row, pos] = mask_id
        yield ids, attn, labels


def _next_item_batches(
    train: list[list[int]], cfg: FinetuneConfig, seq_len: int, rng: random.Random
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    samples = []
    for seq in train:
        if len(seq) < 2:
            continue
        cuts = [len(seq) - 1] + [rng.randint(1, len(seq) - 1) for _ in range(2 * math.ceil(len(seq) / seq_len) - 1)]
        samples.extend((seq[max(0, c - seq_len):c], seq[c]) for c in cuts)
    rng.shuffle(samples)
    for start in range(0, len(samples), cfg.batch_size):
        chunk = samples[start:start + cfg.batch_size]
        ids, attn = encode_histories([h for h, _ in chunk], seq_len)
        yield ids, attn, torch.tensor([t - 1 for _, t in chunk])  # label j = item j + 1


@torch.no_grad()
def _init_popularity_bias(model: nn.Module, kind: str, split: Split) -> None:
    """Output bias = log training popularity (centred): training starts at the popularity baseline."""
    counts = torch.ones(split.num_items + 1)
    for seq in split.train:
        if seq:
            counts.index_add_(0, torch.tensor(seq), torch.ones(len(seq)))
    prior = counts.log()
    prior -= prior[1:].mean()
    if kind == "bert-cls":
        model.classifier.bias.copy_(prior[1:])  # label j = item j + 1
    else:
        prior[0] = prior[1:].min()  # padding is never a target
        model.bias.copy_(prior)


def _samples_per_epoch(train: list[list[int]], kind: str, seq_len: int) -> int:
    per_seq = 2 if kind == "bert-cls" else 1
    return sum(per_seq * max(1, math.ceil(len(seq) / seq_len)) for seq in train if len(seq) >= 2)


def _loss(model: nn.Module, kind: str, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "bert-cls":
        logits = model(input_ids=ids, attention_mask=attn).logits
        return nn.functional.cross_entropy(logits.float(), labels)
    picked = labels != -100
    hidden = model.hidden(ids, attn)[picked]
    return nn.functional.cross_entropy(model.score(hidden).float(), labels[picked])


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


# ---------------------------------------------------------------- training
def _evaluate(model: nn.Module, kind: str, split: Split, cases: str, seq_len: int, precision: str,
              device: torch.device, users: int | None = None, cfg: dict[str, Any] | None = None) -> dict[str, float]:
    model.eval()
    fn = _scores_fn(model, kind)

    def score(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), _autocast(precision, device):
            return fn(ids.to(device), mask.to(device)).float().cpu()

    evalset = (split.valid if cases == "valid" else split.test).subset(users)
    return evaluate_ranking(score, evalset, split.num_items, seq_len=seq_len, append_mask=_append_mask(kind, cfg or {"items": split.num_items}))


def finetune(
    spec: str,
    data: MovieLens,
    config: FinetuneConfig | None = None,
    *,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Train ``spec`` (``bert4rec:base``, ``bert-cls:tiny``, ``bert4rec-text:base``) on ``data``.

    ``on_epoch`` receives each epoch's record (epoch, step, loss, lr, valid
    hr@10/ndcg@10 when evaluated, elapsed_s). Returns the best model by
    validation NDCG@10, evaluated on the test split.
    """
    cfg = config or FinetuneConfig()
    cfg.check()
    kind, size = _parse_spec(spec)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    precision = resolve_precision(cfg.precision, device)
    model_cfg = _model_config(kind, size, data.num_items, cfg.seq_len)
    seq_len = int(model_cfg["seq"])
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = build_model(kind, model_cfg)
    if kind == "bert4rec-text" and data.titles:
        from graphopt.rec.zoo.text import init_items_from_titles

        init_items_from_titles(model, data.titles)
    split = data.leave_one_out()
    if cfg.popularity_init:
        _init_popularity_bias(model, kind, split)
    if cfg.dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):  # attention dropout too: SDPA reads .p
                module.p = cfg.dropout
    model.to(device)
    mask_id = _append_mask(kind, model_cfg)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if kind == "bert-cls":
            return _next_item_batches(split.train, cfg, seq_len, rng)
        assert mask_id is not None
        return _masked_batches(split.train, cfg, seq_len, mask_id, rng)

    steps_per_epoch = math.ceil(_samples_per_epoch(split.train, kind, seq_len) / cfg.batch_size)
    planned = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    optimizer = _optimizer(model, cfg)
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    schedule = _Schedule(planned, cfg.warmup, budget)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    result = FinetuneResult(model=model, kind=kind, spec=f"{kind}:{size}", model_config=model_cfg,
                            train_config=cfg, precision=precision, device=str(device), data=data.describe())
    result.popularity = {"valid": popularity_metrics(split, "valid"), "test": popularity_metrics(split, "test")}
    log.info("fine-tuning %s on %s: %d steps/epoch, %s on %s", spec, data.name, steps_per_epoch, precision, device)

    best_ndcg, best_state, since_best = -1.0, None, 0
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
            for ids, attn, labels in batches():
                ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
                with _autocast(precision, device):
                    loss = _loss(model, kind, ids, attn, labels)
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
                           f"best valid NDCG@10 {max(best_ndcg, 0):.4f}")
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
                metrics = _evaluate(model, kind, split, "valid", seq_len, precision, device, cfg.eval_users, model_cfg)
                record["eval_s"] = time.perf_counter() - eval_start
                record["valid_hr@10"], record["valid_ndcg@10"] = metrics["hr@10"], metrics["ndcg@10"]
                if metrics["ndcg@10"] > best_ndcg:
                    best_ndcg, since_best = metrics["ndcg@10"], 0
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                    result.valid = {k: v for k, v in metrics.items() if k != "users"}
                else:
                    since_best += 1
                    if since_best >= cfg.patience and not result.stopped:
                        result.stopped = f"early stop: no better validation NDCG@10 in {cfg.patience} evaluations"
            elapsed = time.perf_counter() - start
            record["elapsed_s"] = elapsed
            result.history.append(record)
            log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
            if "valid_ndcg@10" in record:
                bar.note(f"epoch {epoch}: loss {record['loss']:.4f}, valid NDCG@10 {record['valid_ndcg@10']:.4f} "
                         f"HR@10 {record['valid_hr@10']:.4f} ({elapsed:.0f}s)")
            if on_epoch is not None:
                on_epoch(record)
        if not result.stopped:
            result.stopped = f"{cfg.epochs} epochs done"
        bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        test = _evaluate(model, kind, split, "test", seq_len, precision, device, None, model_cfg)
        result.test = {k: v for k, v in test.items() if k != "users"}
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    model.eval().cpu()
    result.steps, result.epochs, result.wall_s = step, epoch, time.perf_counter() - start
    log.info("fine-tuned %s: valid %s, test %s (%s)", spec, result.valid, result.test, result.stopped)
    return result


# --------------------------------------------------------------- checkpoint
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
    def append_mask(self) -> int | None:
        return _append_mask(self.kind, self.model_config)

    def make_inputs(self, batch: int = 4, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded random item histories shaped like real ones (left padding)."""
        seq = seq or int(self.model_config["seq"])
        items = int(self.model_config["items"])
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=g).tolist()
        histories = [torch.randint(1, items + 1, (n,), generator=g).tolist() for n in lengths]
        ids, mask = encode_histories(histories, seq, self.append_mask)
        return {"input_ids": ids, "attention_mask": mask}

    def zoo_model(self, batch: int = 4) -> Any:
        """As a :class:`graphopt.models.ZooModel`, ready to ``capture()``."""
        from graphopt.rec.zoo import ZooModel

        items = int(self.model_config["items"])
        high = items + 2 if self.append_mask is not None else items + 1
        dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
        zoo = ZooModel(
            name=f"{self.name}@{self.meta.get('data', {}).get('name', 'finetuned')}",
            module=self.model,
            config=self.model_config,
            make_inputs=self.make_inputs,
            dynamic=dyn,
            input_ranges={"input_ids": (1, high), "attention_mask": (1, 2)},
            batch=batch,
            seq=int(self.model_config["seq"]),
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
                 "num_items": int(result.model_config["items"]), "k": 10},
        "data": result.data,
        "metrics": {"valid": result.valid, "test": result.test, "popularity": result.popularity},
        "training": {**asdict(result.train_config), "steps": result.steps, "epochs": result.epochs,
                     "wall_s": round(result.wall_s, 1), "precision": result.precision,
                     "device": result.device, "stopped": result.stopped},
        "history": result.history,
        "versions": {"torch": torch.__version__},
    }
    with atomic_directory(out_dir, force=force) as tmp:
        save_model(result.model, str(tmp / WEIGHTS_FILE))
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
    kind, cfg = meta["kind"], meta["config"]
    model = build_model(kind, cfg, pretrained=False)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{path} has no {WEIGHTS_FILE}; re-create the checkpoint with `graphopt finetune -o`")
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
