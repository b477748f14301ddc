"""Fine-tuning the GPT- and T5-style recommenders: their objectives learn, checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch

from graphopt.rec.data import evaluate_ranking, synthetic_movielens
from graphopt.rec.finetune import FinetuneConfig, finetune, load_checkpoint, save_checkpoint
from graphopt.rec.finetune.generative import CausalNextItem


@pytest.fixture(scope="module")
def small():
    return synthetic_movielens(users=64, items=100, interactions=1300, seed=0)


def _quick(**kw):
    base = dict(epochs=3, max_minutes=None, batch_size=16, lr=5e-3, seed=0, precision="fp32", dropout=0.0, patience=10)
    base.update(kw)
    return FinetuneConfig(**base)


def test_causal_batches_predict_the_next_item_at_every_real_position():
    import random

    train = [[5, 6, 7, 8], [9, 10]]
    (ids, attn, labels), = CausalNextItem().batches(train, _quick(batch_size=8), 4, {}, random.Random(0))
    rows = {tuple(r.tolist()) for r in ids}
    assert rows == {(0, 5, 6, 7), (0, 0, 0, 9)}
    for row_ids, row_attn, row_labels in zip(ids, attn, labels):
        real = row_attn.bool()
        assert (row_labels[~real] == -100).all()  # no loss on padding
        # the label at position t is the input at t + 1 (the next item)
        torch.testing.assert_close(row_labels[real][:-1], row_ids[real][1:])
    assert sorted(labels[:, -1].tolist()) == [8, 10]


@pytest.mark.parametrize("name", ["gpt-rec:tiny", "t5-rec:tiny"])
def test_generative_models_learn_and_round_trip(small, name, tmp_path):
    r = finetune(name, small, _quick(epochs=3))
    losses = [h["loss"] for h in r.history]
    assert losses[-1] < losses[0] - 0.05, losses  # starts near ln(101) = 4.62
    assert 0.0 <= r.test["ndcg@10"] <= r.test["hr@10"] <= 1.0
    split = small.leave_one_out()
    m = evaluate_ranking(lambda i, a: r.model(i, a), split.test, small.num_items, seq_len=16)
    assert m["ndcg@10"] == pytest.approx(r.test["ndcg@10"], abs=1e-6)
    ckpt = load_checkpoint(save_checkpoint(r, tmp_path / "ckpt"))  # tied T5 tables survive safetensors
    inputs = ckpt.make_inputs(batch=3, seed=1)
    with torch.no_grad():
        assert torch.equal(ckpt.model(**inputs), r.model(**inputs))


def test_seq2seq_batches_teacher_force_the_items_after_each_cut():
    import random

    from graphopt.rec.finetune.generative import Seq2SeqNextItem

    obj = Seq2SeqNextItem()
    train = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21]]
    rows = [b for b in obj.batches(train, _quick(batch_size=64), 4, {}, random.Random(0))]
    ids, attn, labels = rows[0]
    assert labels.shape == (ids.shape[0], obj.future) and len(rows) == 1
    by_user = {}
    for row_ids, row_attn, row_labels in zip(ids, attn, labels):
        history = row_ids[row_attn.bool()].tolist()
        seq = train[0] if history[0] >= 5 and history[0] < 20 else train[1]
        cut = seq.index(history[-1]) + 1
        assert history == seq[max(0, cut - 4):cut]  # at most seq_len items before the cut
        future = seq[cut:cut + obj.future]
        assert row_labels[:len(future)].tolist() == future  # the items that followed, in order
        assert (row_labels[len(future):] == -100).all()  # nothing past the user's history
        by_user.setdefault(seq[0], []).append(cut)
    assert len(train[1]) - 1 in by_user[20] and len(train[0]) - 1 in by_user[5]  # every user's last item is a target


def test_seq2seq_loss_scores_every_future_step_and_serving_reads_the_first():
    from graphopt.rec.finetune.generative import Seq2SeqNextItem
    from graphopt.rec.zoo.t5 import SIZES, T5Rec

    torch.manual_seed(0)
    cfg = dict(SIZES["tiny"], items=30)
    model = T5Rec(30, cfg).eval()
    ids = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]])
    attn = (ids != 0).long()
    labels = torch.tensor([[6, 7, 8, -100, -100, -100, -100, -100], [10, 11, 12, 13, 14, 15, 16, 17]])
    with torch.no_grad():
        loss = Seq2SeqNextItem().loss(model, (ids, attn, labels))
        # by hand: teacher forcing with the start token then the labels, mean over the 11 real targets
        dec = torch.tensor([[0, 6, 7, 0, 0, 0, 0, 0], [0, 10, 11, 12, 13, 14, 15, 16]])
        logits = model.logits(ids, attn, dec)
        real = labels != -100
        expected = torch.nn.functional.cross_entropy(logits[real], labels[real])
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        # serving (forward) is the first decoder step: the same scores as position 0 of training
        torch.testing.assert_close(model(ids, attn), logits[:, 0], rtol=1e-5, atol=1e-5)
