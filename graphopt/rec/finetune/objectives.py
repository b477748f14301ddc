"""Training objectives: how each fine-tunable model kind is built, batched, scored and evaluated.

An :class:`Objective` owns everything that differs between model kinds; the
training loop (:mod:`.loop`) and checkpoints (:mod:`.checkpoint`) only talk to
it. Register a new kind with :func:`register_objective`.

=================  ===========================================================
``bert4rec``       masked-item (Cloze): random positions -> [mask], predict the
                   item at each over all items (optionally a share of samples
                   mask only the last position, as evaluation does)
``bert4rec-text``  the same, from pretrained MiniLM-L6 with the item table
                   initialised from item-title embeddings
``bert-cls``       next-item classification: history -> label of the next item
                   (``num_labels`` = items)
``dlrm``,          click prediction on MovieLens-100K clicks (binary
``two-tower``      cross-entropy of the click logit; AUC/logloss), see
                   :mod:`.clicks`
``gpt-rec``        causal next-item at every position (:mod:`.generative`)
``t5-rec``         seq2seq: history -> one decoder step (:mod:`.generative`)
=================  ===========================================================
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from graphopt.errors import ModelNotFoundError
from graphopt.rec.data import MovieLens, Split, encode_histories, evaluate_ranking, popularity_metrics
from graphopt.rec.finetune.item_init import MAX_ITEMS, cooccurrence_embeddings
from graphopt.rec.finetune.precision import autocast

if TYPE_CHECKING:
    from graphopt.rec.finetune.loop import FinetuneConfig

__all__ = ["Objective", "MaskedItem", "NextItemClassification", "register_objective", "get_objective",
           "model_kinds", "windows", "cut_points", "next_item_batches", "MAX_SEQ_LEN", "SpecError", "check_seq_len"]

Batch = tuple[torch.Tensor, ...]
log = logging.getLogger(__name__)

#: the longest history the zoo's sequence models are fine-tuned on: their position tables grow past
#: BERT's and GPT-2's 512 rows with the history (the new rows learned from scratch), and attention's
#: seq x seq scores at a training batch of 64 pass several GB per layer beyond this
MAX_SEQ_LEN = 2048


class SpecError(ModelNotFoundError):
    """A size or setting the model cannot take (a usage error, refused before any data loads)."""


def check_seq_len(kind: str, seq_len: int | None) -> None:
    """Refuse a history length past :data:`MAX_SEQ_LEN` (or below 1) with one line."""
    if seq_len is not None and not 1 <= seq_len <= MAX_SEQ_LEN:
        raise SpecError(f"seq-len {seq_len}: {kind} is fine-tuned on histories of 1 to {MAX_SEQ_LEN} items "
                        f"(longer ones outgrow memory in attention); pass --seq-len {MAX_SEQ_LEN} or less")


def windows(seq: list[int], length: int, rng: random.Random) -> list[list[int]]:
    """The latest window plus random earlier ones, about one per ``length`` items."""
    if len(seq) <= length:
        return [seq]
    out = [seq[-length:]]
    for _ in range(math.ceil(len(seq) / length) - 1):
        end = rng.randint(length, len(seq) - 1)
        out.append(seq[end - length:end])
    return out


class Objective:
    """One model kind's training objective. Subclasses set ``kind`` and implement
    :meth:`build`, :meth:`batches`, :meth:`loss` and :meth:`scores`.

    The defaults fit sequence recommenders over item ids (left-padded
    ``input_ids`` + ``attention_mask``, scores over items, leave-one-out
    HR@10/NDCG@10 with early stopping on validation NDCG@10).
    """

    kind: ClassVar[str] = ""
    #: the validation metric early stopping and "best weights" follow (higher is better)
    selection_metric: ClassVar[str] = "ndcg@10"
    #: raised when the objective trains a different model from the same settings (caches key on it)
    revision: ClassVar[int] = 1

    # ------------------------------------------------------------ the model
    def model_config(self, size: str, num_items: int, seq_len: int | None) -> dict[str, Any]:
        from graphopt.rec.zoo.bert import SIZES

        if size not in SIZES:
            raise ModelNotFoundError(f"model '{self.kind}' has no size '{size}'; sizes: {', '.join(SIZES)}")
        cfg = dict(SIZES[size])
        cfg["items"] = num_items
        cfg["seq"] = seq_len or cfg["seq"]
        return cfg

    def config_for(self, size: str, data: Any, seq_len: int | None) -> dict[str, Any]:
        """The model config for ``size`` sized for ``data`` (default: its item count)."""
        check_seq_len(self.kind, seq_len)
        return self.model_config(size, data.num_items, seq_len)

    def check_spec(self, size: str, seq_len: int | None) -> None:
        """Refuse an unknown ``size`` or a ``seq_len`` the model cannot read, before any data loads
        (a 100000-item history otherwise fails deep in training, asking for hundreds of GB)."""
        check_seq_len(self.kind, seq_len)
        self.model_config(size, 1, seq_len)

    def build(self, cfg: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        raise NotImplementedError

    def split(self, data: Any, mcfg: dict[str, Any]) -> Any:
        """Train/validation/test data (default: leave-one-out over item sequences)."""
        return data.leave_one_out()

    def baseline(self, split: Any) -> dict[str, dict[str, float]]:
        """The popularity baseline's validation and test metrics."""
        return {"valid": popularity_metrics(split, "valid"), "test": popularity_metrics(split, "test")}

    def prepare(self, model: nn.Module, data: MovieLens) -> None:
        """Initialise from the data before training (e.g. item-title embeddings)."""

    def append_mask(self, cfg: dict[str, Any]) -> int | None:
        """The [mask] id appended to histories at scoring time, or None."""
        return None

    @torch.no_grad()
    def init_bias(self, model: nn.Module, split: Split) -> None:
        """Output bias = log training popularity (centred): step 0 is the popularity baseline."""

    def item_table(self, model: nn.Module) -> torch.Tensor | None:
        """Rows ``1..items`` of the model's item embedding table (a view written in place), or None
        where the model has none to initialise from co-occurrence."""
        return None

    @torch.no_grad()
    def init_items(self, model: nn.Module, split: Split, window: int = 10) -> bool:
        """Item table = factorised co-occurrence of the training histories (:mod:`.item_init`), at the
        spread the model's own initialisation gave it; False where the model has no such table."""
        table = self.item_table(model)
        if table is None:
            return False
        if split.num_items > MAX_ITEMS:
            log.warning("item table keeps its random start: %d items is more than the co-occurrence start's "
                        "%d (pass item_init='random' to silence this)", split.num_items, MAX_ITEMS)
            return False
        try:
            emb = cooccurrence_embeddings(split.train, split.num_items, table.shape[1], window=window,
                                          std=float(table.float().std()))
        except (ValueError, torch.linalg.LinAlgError) as e:  # a few short histories: nothing to factorise
            log.warning("item table keeps its random start: the co-occurrence of %d training histories "
                        "cannot be factorised (%s)", len(split.train), str(e).split(":")[0])
            return False
        table.copy_(emb.to(table.dtype))
        return True

    # ------------------------------------------------------------- training
    def samples_per_epoch(self, train: list[list[int]], seq_len: int) -> int:
        return sum(max(1, math.ceil(len(seq) / seq_len)) for seq in train if len(seq) >= 2)

    def batches(self, train: list[list[int]], cfg: FinetuneConfig, seq_len: int, mcfg: dict[str, Any],
                rng: random.Random) -> Iterator[Batch]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    # --------------------------------------------------------------- scoring
    def scores(self, model: nn.Module) -> Callable[..., torch.Tensor]:
        """The model's scoring function on its captured inputs."""
        return lambda ids, mask: model(ids, mask)

    def evaluate(self, model: nn.Module, split: Split, cases: str, seq_len: int, mcfg: dict[str, Any],
                 precision: str, device: torch.device, users: int | None = None) -> dict[str, float]:
        """Leave-one-out HR@10/NDCG@10 on ``split``'s valid or test cases."""
        model.eval()
        fn = self.scores(model)

        def score(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), autocast(precision, device):
                return fn(ids.to(device), mask.to(device)).float().cpu()

        evalset = (split.valid if cases == "valid" else split.test).subset(users)
        return evaluate_ranking(score, evalset, split.num_items, seq_len=seq_len, append_mask=self.append_mask(mcfg))

    # ------------------------------------------------------- capture inputs
    def example_inputs(self, mcfg: dict[str, Any], batch: int = 4, seq: int | None = None,
                       seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded random item histories shaped like real ones (left padding)."""
        seq = seq or int(mcfg["seq"])
        items = int(mcfg["items"])
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=g).tolist()
        histories = [torch.randint(1, items + 1, (n,), generator=g).tolist() for n in lengths]
        ids, mask = encode_histories(histories, seq, self.append_mask(mcfg))
        return {"input_ids": ids, "attention_mask": mask}

    def dynamic(self) -> dict[str, dict[int, str]]:
        return {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}

    def input_ranges(self, mcfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
        items = int(mcfg["items"])
        high = items + 2 if self.append_mask(mcfg) is not None else items + 1
        return {"input_ids": (1, high), "attention_mask": (1, 2)}


def _popularity_prior(split: Split) -> torch.Tensor:
    counts = torch.ones(split.num_items + 1)
    for seq in split.train:
        if seq:
            counts.index_add_(0, torch.tensor(seq), torch.ones(len(seq)))
    prior = counts.log()
    prior -= prior[1:].mean()
    return prior


class MaskedItem(Objective):
    """BERT4Rec's Cloze objective over item ids (``bert4rec``, ``bert4rec-text``)."""

    def __init__(self, kind: str = "bert4rec", text: bool = False):
        self.kind = kind  # type: ignore[misc]
        self.text = text

    def model_config(self, size: str, num_items: int, seq_len: int | None) -> dict[str, Any]:
        if not self.text:
            return super().model_config(size, num_items, seq_len)
        from graphopt.rec.zoo.text import SIZES, text_config

        if size not in SIZES:
            raise ModelNotFoundError(f"model '{self.kind}' has no size '{size}'; sizes: {', '.join(SIZES)}")
        return text_config(SIZES[size]["layers"], num_items, seq_len or SIZES[size]["seq"])

    def build(self, cfg: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        if self.text:
            from graphopt.rec.zoo.text import build_text_bert4rec

            return build_text_bert4rec(cfg, pretrained=pretrained)
        from graphopt.rec.zoo.bert import Bert4Rec

        return Bert4Rec(cfg["items"], cfg)

    def prepare(self, model: nn.Module, data: MovieLens) -> None:
        if self.text and data.titles:
            from graphopt.rec.zoo.text import init_items_from_titles

            init_items_from_titles(model, data.titles)

    def append_mask(self, cfg: dict[str, Any]) -> int | None:
        return int(cfg["items"]) + 1

    @torch.no_grad()
    def init_bias(self, model: nn.Module, split: Split) -> None:
        prior = _popularity_prior(split)
        prior[0] = prior[1:].min()  # padding is never a target
        model.bias.copy_(prior)

    def item_table(self, model: nn.Module) -> torch.Tensor | None:
        if self.text:  # initialised from item titles (``prepare``)
            return None
        return model.bert.embeddings.word_embeddings.weight[1:model.items + 1]

    def batches(self, train: list[list[int]], cfg: FinetuneConfig, seq_len: int, mcfg: dict[str, Any],
                rng: random.Random) -> Iterator[Batch]:
        mask_id = self.append_mask(mcfg)
        samples = [w for seq in train if len(seq) >= 2 for w in windows(seq, seq_len, rng)]
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

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ids, attn, labels = batch
        picked = labels != -100
        hidden = model.hidden(ids, attn)[picked]
        return nn.functional.cross_entropy(model.score(hidden).float(), labels[picked])


class NextItemClassification(Objective):
    """``bert-cls``: BertForSequenceClassification, history -> the next item's label (item j = label j-1)."""

    kind = "bert-cls"

    def build(self, cfg: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        from transformers import BertForSequenceClassification

        from graphopt.rec.zoo.bert import _bert_config

        config = _bert_config(cfg, cfg["items"] + 2)
        config.num_labels = cfg["items"]
        config.problem_type = "single_label_classification"
        return BertForSequenceClassification(config)

    @torch.no_grad()
    def init_bias(self, model: nn.Module, split: Split) -> None:
        model.classifier.bias.copy_(_popularity_prior(split)[1:])  # label j = item j + 1

    def samples_per_epoch(self, train: list[list[int]], seq_len: int) -> int:
        return 2 * super().samples_per_epoch(train, seq_len)

    def batches(self, train: list[list[int]], cfg: FinetuneConfig, seq_len: int, mcfg: dict[str, Any],
                rng: random.Random) -> Iterator[Batch]:
        yield from next_item_batches(train, cfg.batch_size, seq_len, rng, label_offset=-1)  # label j = item j + 1

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ids, attn, labels = batch
        logits = model(input_ids=ids, attention_mask=attn).logits
        return nn.functional.cross_entropy(logits.float(), labels)

    def scores(self, model: nn.Module) -> Callable[..., torch.Tensor]:
        return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


_OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Make ``objective.kind`` fine-tunable (``graphopt finetune KIND:SIZE``)."""
    _OBJECTIVES[objective.kind] = objective
    return objective


def get_objective(kind: str) -> Objective:
    if kind not in _OBJECTIVES:
        raise ModelNotFoundError(f"cannot fine-tune '{kind}'; fine-tunable models: {', '.join(_OBJECTIVES)}")
    return _OBJECTIVES[kind]


def model_kinds() -> tuple[str, ...]:
    return tuple(_OBJECTIVES)


def cut_points(seq: list[int], seq_len: int, rng: random.Random) -> list[int]:
    """Where to cut a history of 2+ items into (before, next): its last item and about two random
    earlier cuts per ``seq_len`` of history."""
    return [len(seq) - 1] + [rng.randint(1, len(seq) - 1) for _ in range(2 * math.ceil(len(seq) / seq_len) - 1)]


def next_item_batches(train: list[list[int]], batch_size: int, seq_len: int, rng: random.Random,
                      label_offset: int = 0) -> Iterator[Batch]:
    """(ids, mask, next item + ``label_offset``) batches: each user's last item and about two
    random cut points per ``seq_len`` of history, the ``seq_len`` items before each as input."""
    samples = [(seq[max(0, c - seq_len):c], seq[c]) for seq in train if len(seq) >= 2
               for c in cut_points(seq, seq_len, rng)]
    rng.shuffle(samples)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        ids, attn = encode_histories([h for h, _ in chunk], seq_len)
        yield ids, attn, torch.tensor([t + label_offset for _, t in chunk])


register_objective(MaskedItem("bert4rec"))
register_objective(NextItemClassification())
register_objective(MaskedItem("bert4rec-text", text=True))


def _register_click_models() -> None:
    from graphopt.rec.finetune.clicks import ClickThrough

    register_objective(ClickThrough("dlrm"))
    register_objective(ClickThrough("two-tower"))


_register_click_models()

from graphopt.rec.finetune import generative as _generative  # noqa: E402 (registers after the base class exists)

register_objective(_generative.CausalNextItem())
register_objective(_generative.Seq2SeqNextItem())
