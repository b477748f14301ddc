"""CTR models on real data: MovieLens-100K as clicks (counts, features, a disjoint
split, inputs without label leaks), the item-CTR baseline, Zipf-skewed lookups
of the zoo models, the click-through fine-tuning objective, and the per-slot
index ranges of the runtime contract."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import RunnerError
from graphopt.rec.data.ctr import dlrm_inputs, load_clicks, popularity_baseline, two_tower_inputs
from graphopt.rec.zoo.skew import ZipfIds
from tests.rec import needs_data


@pytest.fixture(scope="module")
def clicks():
    return load_clicks()


@pytest.fixture(scope="module")
def split(clicks):
    return clicks.split(seed=0)


@needs_data
def test_movielens_clicks_counts_and_features(clicks):
    assert (clicks.num_users, clicks.num_items, clicks.num_interactions) == (943, 1682, 100_000)
    assert int(clicks.clicks.sum()) == 55_375  # ratings of 4 and 5
    assert clicks.cardinalities() == {"user": 943, "item": 1682, "occupation": 21, "zip_prefix": 111, "genres": 19}
    assert clicks.max_genres == 6 and int((clicks.genres[1:] > 0).sum(1).min()) == 1  # every movie has a genre
    assert int(clicks.user.min()) == 1 and int(clicks.item.min()) == 1  # 0 is padding
    assert abs(float(clicks.age[1:].mean())) < 1e-5 and abs(float(clicks.age[1:].std()) - 1) < 1e-3


@needs_data
def test_split_is_disjoint_covering_and_seeded(clicks, split):
    parts = [split.train, split.valid, split.test]
    assert [len(p) for p in parts] == [80_000, 10_000, 10_000]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(100_000))  # each rating in exactly one part
    assert torch.equal(clicks.split(seed=0).test, split.test) and not torch.equal(clicks.split(seed=1).test, split.test)
    assert 0.5 < float(split.clicks("test").mean()) < 0.6


@needs_data
def test_model_inputs_hold_the_features_and_no_label(clicks, split):
    rows = split.test[:50]
    x = dlrm_inputs(clicks, rows)
    assert x["sparse"].shape == (50, 5, 6) and x["dense"].shape == (50, 1)
    assert torch.equal(x["sparse"][:, 1, 0], clicks.item[rows]) and int(x["sparse"][:, :4, 1:].abs().sum()) == 0
    assert torch.equal(x["sparse"][:, 4], clicks.genres[clicks.item[rows]])
    tt = two_tower_inputs(split, split.train, history=20)
    assert not bool((tt["history"] == tt["candidate_ids"]).any())  # a training row never sees its own item
    train_clicks = {(u, i) for u, i, c in zip(clicks.user[split.train].tolist(), clicks.item[split.train].tolist(),
                                               clicks.clicks[split.train].tolist()) if c > 0}
    for u, hist in zip(tt["user_ids"][:300].tolist(), tt["history"][:300].tolist()):
        assert all((u, i) in train_clicks for i in hist if i)  # history = that user's training clicks only


@needs_data
def test_popularity_baseline_beats_chance(split):
    base = popularity_baseline(split, "test")
    assert 0.65 < base["auc"] < 0.75 and base["logloss"] < 0.69  # constant predictor: ~0.687


def test_zipf_ids_are_skewed_in_range_and_seeded():
    ids = ZipfIds(200_000, table_seed=3)
    draw = ids((20_000,), torch.Generator().manual_seed(0))
    assert int(draw.min()) >= 0 and int(draw.max()) < 200_000
    # the 2,000 most popular ids take ~64% of the draws (H(2000)/H(200000)); uniform draws would give 1%
    head = float(torch.isin(draw, ids.ids[:2000]).float().mean())
    assert abs(head - ids.head_share(2000)) < 0.02 and ids.head_share(2000) > 0.6
    assert torch.equal(draw, ids((20_000,), torch.Generator().manual_seed(0)))
    low = ZipfIds(10, low=1)((500,), torch.Generator().manual_seed(1))
    assert int(low.min()) >= 1 and int(low.max()) <= 10


def test_dlrm_draws_each_feature_from_its_own_table(zoo):
    z = zoo("dlrm:tiny")
    sparse = z.make_inputs(batch=512, seed=0)["sparse"]
    for t, rows in enumerate(z.config["tables"]):
        assert int(sparse[:, t].max()) < rows
        assert int(sparse[:, t].max()) >= min(rows, 100) // 2  # not clipped to the smallest table's range


def test_contract_holds_each_slot_to_its_own_table(program, tmp_path):
    p = program("dlrm:tiny")
    art = graphopt.lower(p, "eager", tmp_path / "e")
    assert art.manifest["index_ranges"] == {"sparse": {"dim": 1, "high": [100, 80, 60, 40]}}
    x = list(p.sample_inputs(batch=4, seed=0))
    x[1] = x[1].clone()
    x[1][:, 0] = 99  # fine for table 0 (100 rows)
    with graphopt.load(art.path) as runner:
        runner(*x)
        x[1][2, 3, 1] = 40  # table 3 has 40 rows
        with pytest.raises(RunnerError, match=r"input 'sparse'\[:, 3, \.\.\.\]: values must be in \[0, 40\), got 40 at \[2, 3, 1\]"):
            runner(*x)


@needs_data
@pytest.mark.parametrize("spec,steps", [("dlrm:tiny", 100), ("two-tower:tiny", 60)])
def test_click_objective_raises_auc_beyond_noise(clicks, spec, steps):
    """A short seeded run lifts validation AUC well above the untrained model's.

    Margin: under no signal, AUC over 2,000 held-out ratings (~1,100 clicks,
    ~900 not) has a standard error of sqrt((P + N + 1) / (12 P N)) = 0.0065,
    so a 0.05 gain is ~8 standard errors, which noise does not reach.
    """
    from graphopt.rec.finetune import FinetuneConfig, finetune, get_objective

    objective = get_objective(spec.split(":")[0])
    cfg = objective.config_for("tiny", clicks, None)
    torch.manual_seed(0)
    model = objective.build(cfg)
    task = objective.split(clicks, cfg)
    objective.init_bias(model, task)
    before = objective.evaluate(model, task, "valid", 0, cfg, "fp32", torch.device("cpu"), users=2000)["auc"]
    result = finetune(spec, clicks, FinetuneConfig(epochs=1, max_steps=steps, max_minutes=None, batch_size=256,
                                                   lr=1e-2, precision="fp32", eval_users=2000, seed=0, threads=1))
    assert result.valid["auc"] > before + 0.05, (before, result.valid)
    assert result.test["auc"] > 0.6 and set(result.popularity) == {"valid", "test"}


@needs_data
def test_finetune_verb_saves_a_ctr_checkpoint_that_captures(split, tmp_path, capsys):
    from graphopt.cli import main
    from graphopt.rec.finetune import load_checkpoint

    out = tmp_path / "ckpt"
    assert main(["finetune", "dlrm:tiny", "-o", str(out), "--max-steps", "5", "--epochs", "1", "--threads", "1",
                 "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "55375 clicks" in printed and "test  AUC" in printed and "popularity baseline AUC 0.70" in printed
    ckpt = load_checkpoint(out)
    assert ckpt.model_config["tables"] == [944, 1683, 22, 112, 20] and ckpt.model_config["dense"] == 1
    program = ckpt.capture(batch=8)
    rows = ckpt.objective.encode(split, "test", ckpt.model_config)
    x = tuple(v[:8] for v in rows.inputs.values())
    torch.testing.assert_close(program(*x)[0], ckpt.model(*x), atol=1e-5, rtol=1e-5)


@needs_data
def test_real_data_setup_guards_ctr_models_on_validation_ratings_and_calibrates_on_training_ones(
        clicks, split, tmp_path, capsys):
    """Was: no validation for CTR models (their int8 guard never saw AUC/logloss) and calibration batches
    drawn from the test ratings."""
    from graphopt.cli import main
    from graphopt.cli.real_data import real_data_setup
    from graphopt.rec.finetune import load_checkpoint

    out = tmp_path / "ckpt"
    assert main(["finetune", "dlrm:tiny", "-o", str(out), "--max-steps", "2", "--epochs", "1", "--threads", "1",
                 "--precision", "fp32"]) == 0
    ckpt = load_checkpoint(out)
    setup = real_data_setup(clicks, ckpt, 8, eval_users=64, quick=True)
    encode = {part: ckpt.objective.encode(split, part, ckpt.model_config) for part in ("train", "valid", "test")}
    valid = setup["validation"]
    assert "validation" in valid.name and len(valid.labels) == 64
    torch.testing.assert_close(valid.labels, encode["valid"].clicks[:64])
    names = list(encode["valid"].inputs)
    for i, batch in enumerate(valid.batches):
        for name, t in zip(names, batch):
            assert torch.equal(t, encode["valid"].inputs[name][8 * i:8 * i + 8])

    def rows(part):
        return {tuple(float(v) for v in r) for r in torch.cat(
            [encode[part].inputs[n].reshape(len(encode[part]), -1).double() for n in names], 1).tolist()}

    train = rows("train")
    for batch in setup["calibration"]:
        drawn = torch.cat([t.reshape(8, -1).double() for t in batch], 1).tolist()
        assert all(tuple(float(v) for v in r) in train for r in drawn)
