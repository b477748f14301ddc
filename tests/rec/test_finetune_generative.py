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
