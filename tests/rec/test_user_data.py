"""``graphopt finetune --data PATH`` on a user's own MovieLens-style folder: raw ids that are not
1..N (saved with the checkpoint, mapping raw ids to the rows that were trained), duplicate rows,
equal timestamps, BOM / CRLF / leading zeros, non-UTF-8 bytes, click data without clicks or
off-scale ratings, data too small to train, dlrm's BatchNorm and one-row batches, an output
that cannot be written, and bench at batch 1. Tiny generated data; real (short) runs."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from graphopt.cli import main
from graphopt.rec.data import (
    EvalSet,
    evaluate_ranking,
    find_movielens,
    read_movielens_folder,
    synthetic_movielens,
)
from graphopt.rec.data.ctr import read_clicks_folder
from graphopt.rec.finetune import FinetuneConfig, finetune, load_checkpoint

GENRES = ["unknown", "Action", "Comedy"]


def _rows(users=30, items=40, interactions=600, seed=0, raw=str):
    """(user, raw item, rating, timestamp) rows from synthetic sequences, user by user (not time-sorted)."""
    data = synthetic_movielens(users=users, items=items, interactions=interactions, seed=seed)
    return [(str(u + 1), raw(item), 1 + (u + t + item) % 5, 1000 + t)
            for u, seq in enumerate(data.sequences) for t, item in enumerate(seq)]


def _write(folder, rows, *, sep="\t", nl="\n", bom=b"", users=True):
    folder.mkdir(parents=True, exist_ok=True)
    text = nl.join(sep.join(map(str, r)) for r in rows) + nl
    (folder / "u.data").write_bytes(bom + text.encode("latin-1"))
    items = sorted({r[1] for r in rows})
    (folder / "u.item").write_text("".join(f"{i}|Movie {i} (1990)|01-Jan-1990||x|0|{int(i) % 2}|{1 - int(i) % 2}\n"
                                           for i in items))
    if users:
        (folder / "u.user").write_bytes(bom + nl.join(f"{u}|{20 + int(u) % 30}|M|student|{10000 + int(u)}"
                                                      for u in sorted({r[0] for r in rows})).encode() + nl.encode())
        (folder / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)))
    return folder


def _args(model, data, out, *extra):
    return ["finetune", model, "--data", str(data), "-o", str(out), "--max-steps", "2", "--epochs", "1",
            "--precision", "fp32", "--threads", "1", "--max-minutes", "0", *extra]


def _error(capsys):
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if line.startswith("graphopt: error")]
    assert len(err) == 1, captured.err
    return err[0], captured.out


# ------------------------------------------------------------------- 1. raw ids
def test_renumbered_item_ids_are_saved_and_map_raw_ids_to_the_trained_rows(tmp_path, capsys):
    rows = _rows(raw=lambda i: str(100 + 3 * i))  # raw ids 103, 106, ...: not 1..N
    data, out = _write(tmp_path / "data", rows), tmp_path / "ckpt"
    assert main(_args("bert4rec:tiny", data, out)) == 0
    stdout = capsys.readouterr().out
    assert f"{out}/ids.json" in stdout and "renumbered" in stdout
    ckpt = load_checkpoint(out)
    raw_items = sorted({r[1] for r in rows}, key=int)
    assert ckpt.item_ids == raw_items and ckpt.item_index(raw_items[-1]) == len(raw_items)
    assert ckpt.item_index("0" + raw_items[0]) == 1  # "0103" is item 103
    # the saved test metrics, recomputed from the raw file through the saved mapping only
    by_user: dict[str, list[tuple[int, str]]] = {}
    for u, item, _, ts in rows:
        by_user.setdefault(u, []).append((ts, item))
    seqs = [[ckpt.item_index(i) for _, i in sorted(ev)] for _, ev in sorted(by_user.items(), key=lambda kv: int(kv[0]))]
    hist, targets = [s[:-1] for s in seqs if len(s) >= 3], [s[-1] for s in seqs if len(s) >= 3]
    n = len(raw_items)
    seen = torch.zeros(len(hist), n + 1, dtype=torch.bool)
    seen[:, 0] = True
    for r, h in enumerate(hist):
        seen[r, torch.tensor(h)] = True
    fn = ckpt.objective.scores(ckpt.model)
    with torch.inference_mode():
        got = evaluate_ranking(lambda ids, mask: fn(ids, mask).float(), EvalSet(hist, torch.tensor(targets), seen), n,
                               seq_len=int(ckpt.model_config["seq"]), append_mask=ckpt.append_mask)
    saved = ckpt.meta["metrics"]["test"]
    assert got["hr@10"] == pytest.approx(saved["hr@10"], abs=1e-9)
    assert got["ndcg@10"] == pytest.approx(saved["ndcg@10"], abs=1e-6)
    # a checkpoint written before ids were saved still loads (dense ids are the raw ones)
    meta = json.loads((out / "graphopt-checkpoint.json").read_text())
    del meta["ids"]
    (out / "graphopt-checkpoint.json").write_text(json.dumps(meta))
    (out / "ids.json").unlink()
    assert load_checkpoint(out).item_ids is None


def test_click_models_save_user_and_item_ids(tmp_path, capsys):
    rows = _rows(users=40, interactions=400, raw=lambda i: str(7 * i))
    rows = [(str(int(u) * 10), *rest) for u, *rest in rows]  # users 10, 20, ...
    data = read_clicks_folder(_write(tmp_path / "data", rows))
    assert data.renumbered and data.user_ids[:2] == ["10", "20"] and data.item_ids[0] == "7"
    result = finetune("dlrm:tiny", data, FinetuneConfig(max_steps=2, epochs=1, precision="fp32", max_minutes=None))
    assert result.ids["users"] == data.user_ids and result.ids["items"] == data.item_ids


# ------------------------------------------------------ 2, 3, 10: reading rows
def test_duplicate_rows_are_dropped_keeping_each_pairs_first_event(tmp_path):
    rows = _rows()
    last = {}
    for r in rows:
        last[r[0]] = r
    dup = rows + [r for r in rows[:5]] + [(u, i, rt, ts + 10) for u, i, rt, ts in last.values()]
    clean, dirty = read_movielens_folder(_write(tmp_path / "a", rows)), read_movielens_folder(_write(tmp_path / "b", dup))
    assert dirty.sequences == clean.sequences
    assert clean.leave_one_out().test.targets.tolist() == dirty.leave_one_out().test.targets.tolist()
    assert any(f"dropped {5 + len(last)} repeated (user, item) rows (5 exact" in n for n in dirty.notes)


def test_equal_timestamps_keep_the_order_of_a_time_sorted_file(tmp_path):
    # an event log, sorted by time: user 1's last two events share a second, item 9 logged before item 2
    rows = [("1", "5", 3, 10), ("1", "7", 3, 11), ("2", "5", 3, 12), ("2", "7", 3, 13), ("2", "2", 3, 14),
            ("1", "9", 3, 20), ("1", "2", 3, 20)]
    data = read_movielens_folder(_write(tmp_path / "log", rows, users=False))
    assert data.item_ids[data.sequences[0][-1] - 1] == "2"  # file order, not the smaller item id first
    assert data.item_ids[data.sequences[0][-2] - 1] == "9"
    assert any(n.startswith("1 of 2 users' last two events share a timestamp: ordered in the file's order")
               for n in data.notes)


def test_real_movielens_split_is_unchanged():
    folder = find_movielens()
    if folder is None or not folder.exists():
        pytest.skip("real MovieLens-100K not installed")
    data = read_movielens_folder(folder)  # not in time order: ties by item id, as before
    assert data.fingerprint() == "dce6da7ef685" and not data.renumbered
    assert any(n.startswith("415 of 943 users") for n in data.notes)


def test_bom_crlf_and_leading_zeros_are_read_as_the_same_ids(tmp_path):
    rows = _rows(users=20, interactions=300)
    plain = read_clicks_folder(_write(tmp_path / "plain", rows))
    odd = [(u, ("0" + i if k % 3 == 0 else i), *rest) for k, (u, i, *rest) in enumerate(rows)]
    data = read_clicks_folder(_write(tmp_path / "odd", odd, nl="\r\n", bom=b"\xef\xbb\xbf"))
    assert data.user_ids == plain.user_ids and data.item_ids == plain.item_ids
    assert torch.equal(data.item, plain.item) and data.fingerprint() == plain.fingerprint()
    assert any("leading zeros were read as integers" in n for n in data.notes)
    seq = read_movielens_folder(tmp_path / "odd")
    assert seq.sequences == read_movielens_folder(tmp_path / "plain").sequences


# ------------------------------------------------------------- 6, 7: contents
@pytest.mark.parametrize("rating, words", [(5, "all of the"), (1, "none of the")])
def test_click_data_without_both_clicks_and_non_clicks_is_refused(tmp_path, capsys, rating, words):
    rows = [(u, i, rating, ts) for u, i, _, ts in _rows(users=20, interactions=200)]
    assert main(_args("dlrm:tiny", _write(tmp_path / "d", rows), tmp_path / "out")) == 2
    err, _ = _error(capsys)
    assert words in err and "click models need both" in err
    assert not (tmp_path / "out").exists()


def test_ratings_off_the_movielens_scale_are_warned_about(tmp_path):
    rows = [(u, i, 2 * r, ts) for u, i, r, ts in _rows(users=20, interactions=200)]  # 2..10
    data = read_clicks_folder(_write(tmp_path / "d", rows))
    assert [n for n in data.notes if n.startswith("warning:") and "outside MovieLens's 0.5..5 (min 2, max 10)" in n]


def test_recbole_titles_with_a_bad_byte_are_replaced_and_bad_interactions_named(tmp_path):
    folder = tmp_path / "rb"
    folder.mkdir()
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"{u}\t{i}\t4\t{100 * u + i}" for u in range(1, 4) for i in range(1, 6)]
    (folder / "ml-100k.inter").write_text("\n".join(inter) + "\n")
    (folder / "ml-100k.item").write_bytes(b"item_id:token\tmovie_title:token_seq\n1\tToy\xff Story\n")
    data = read_movielens_folder(folder)
    assert data.titles[1] == "Toy\ufffd Story" and data.num_items == 5
    (folder / "ml-100k.inter").write_bytes("\n".join(inter[:3] + ["1\t9\xff\t4\t5"]).encode("latin-1"))
    with pytest.raises(Exception, match=r"ml-100k.inter line 4: byte 0xff is not UTF-8"):
        read_movielens_folder(folder)


# ----------------------------------------------------- 4, 5, 9, 12: refusals
def test_data_with_no_training_samples_is_refused(tmp_path, capsys):
    rows = [r for r in _rows() if r[3] < 1003]  # 3 interactions per user: nothing left to train on
    assert main(_args("bert4rec:tiny", _write(tmp_path / "d", rows), tmp_path / "out")) == 2
    err, _ = _error(capsys)
    assert "no training samples" in err and "4 or more" in err
    assert not (tmp_path / "out").exists()


def test_dlrm_trains_when_the_last_batch_has_one_row(tmp_path):
    data = read_clicks_folder(_write(tmp_path / "d", _rows(users=20, interactions=100)))
    n_train = len(data.split(seed=0).train)
    result = finetune("dlrm:tiny", data, FinetuneConfig(batch_size=n_train - 1, epochs=2, precision="fp32",
                                                        max_minutes=None))
    assert result.steps == 2  # one batch an epoch: the 1-row remainder joined it
    assert all(math.isfinite(h["loss"]) for h in result.history) and 0 <= result.test["auc"] <= 1


def test_batch_size_1_for_batchnorm_models_and_fp16_on_cpu_are_refused_up_front(tmp_path, capsys):
    data = _write(tmp_path / "d", _rows(users=20, interactions=200))
    assert main(_args("dlrm:tiny", data, tmp_path / "out", "--batch-size", "1")) == 2
    err, out = _error(capsys)
    assert "--batch-size 2" in err and "data:" not in out
    if not torch.cuda.is_available():
        assert main(_args("bert4rec:tiny", tmp_path / "missing", tmp_path / "out", "--precision", "fp16")) == 2
        err, _ = _error(capsys)
        assert "fp16" in err and "--precision bf16 or fp32" in err


def test_an_output_that_cannot_be_written_is_refused_before_training(tmp_path, capsys):
    data = _write(tmp_path / "d", _rows())
    (tmp_path / "afile").write_text("x")
    assert main(_args("bert4rec:tiny", data, tmp_path / "afile" / "ckpt")) == 2
    err, out = _error(capsys)
    assert "is a file" in err and "fine-tuning" not in out


def test_stale_temporary_folders_of_a_killed_save_are_removed(tmp_path, capsys):
    data, out = _write(tmp_path / "d", _rows()), tmp_path / "ckpt"
    stale, fresh, other = tmp_path / ".ckpt.tmp-abc123", tmp_path / ".ckpt.tmp-new", tmp_path / ".other.tmp-abc"
    for d in (stale, fresh, other):
        d.mkdir()
        (d / "model.safetensors").write_text("partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    assert main(_args("bert4rec:tiny", data, out)) == 0
    assert not stale.exists() and fresh.exists() and other.exists()
    assert "removed 1 temporary folder" in capsys.readouterr().out


# ------------------------------------------------------------------ 11. bench
def test_bench_a_checkpoint_at_batch_1(tmp_path, capsys):
    data, out = _write(tmp_path / "d", _rows(users=20, interactions=200)), tmp_path / "ckpt"
    assert main(_args("bert4rec:tiny", data, out)) == 0
    capsys.readouterr()
    assert main(["bench", str(out), "--data", str(data), "--batch-sizes", "1", "--runtimes", "eager", "-p", "none",
                 "--quick", "--no-memory", "--threads", "1", "--eval-users", "8", "-o", str(tmp_path / "b")]) == 0
