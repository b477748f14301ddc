"""Fine-tuning and real data, as a script sees them: a folder that already holds a checkpoint
(of another model, data or settings), a checkpoint judged on other data than it learned,
malformed data files, settings refused before the data loads, and the recorded metrics
measured on the fp32 weights that are saved. Tiny models and data; no timing asserts."""

from __future__ import annotations

import json

import pytest
import torch

from graphopt.cli import main
from graphopt.cli.real_data import real_data_setup
from graphopt.errors import ArtifactError
from graphopt.rec.data import (
    SYNTHETIC_NOTICE,
    DataError,
    evaluate_ranking,
    read_movielens_folder,
    synthetic_movielens,
)
from graphopt.rec.data.ctr import read_clicks_folder
from graphopt.rec.finetune import (
    FinetuneConfig,
    finetune,
    get_objective,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from graphopt.rec.finetune.objectives import MAX_SEQ_LEN, SpecError


def _folder(root, seed):
    """A small ml-100k-format folder written from synthetic sequences (not MovieLens data)."""
    data = synthetic_movielens(users=30, items=40, interactions=600, seed=seed)
    folder = root / f"ml-100k-{seed}"
    folder.mkdir()
    lines = [f"{u + 1}\t{item}\t3\t{1000 + t}" for u, seq in enumerate(data.sequences) for t, item in enumerate(seq)]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    (folder / "u.item").write_text("".join(f"{i}|Movie {i} (1990)|||x|0\n" for i in range(1, 41)))
    return folder


def _finetune_args(model, data, out, *extra):
    return ["finetune", model, "--data", str(data), "-o", str(out), "--max-steps", "2", "--epochs", "1",
            "--precision", "fp32", "--threads", "1", "--max-minutes", "0", *extra]


def _one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("graphopt: error")]
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------- finding 1
def test_finetune_into_a_folder_with_another_checkpoint_is_a_usage_error(tmp_path, capsys):
    data, other = _folder(tmp_path, 3), _folder(tmp_path, 4)
    out = tmp_path / "ckpt"
    assert main(_finetune_args("bert4rec:tiny", data, out)) == 0
    first = capsys.readouterr().out
    saved = (out / "model.safetensors").read_bytes()

    assert main(_finetune_args("bert4rec:tiny", data, out)) == 0  # the same fine-tune: done already
    assert "already holds" in capsys.readouterr().out

    for args, what in ((_finetune_args("gpt-rec:tiny", data, out), "not gpt-rec:tiny"),
                       (_finetune_args("bert4rec:tiny", other, out), "other data"),
                       (_finetune_args("bert4rec:tiny", data, out, "--seed", "1"), "seed 0, not 1")):
        assert main(args) == 2, args
        line = _one_error_line(capsys)
        assert what in line and "--fresh" in line and "another -o" in line, line
    assert (out / "model.safetensors").read_bytes() == saved  # untouched

    assert main(_finetune_args("gpt-rec:tiny", data, out, "--fresh")) == 0
    assert load_checkpoint(out).name == "gpt-rec:tiny"
    assert "no time budget" in first and "budget 0 min" not in first  # finding 6: --max-minutes 0 is no budget


def test_a_fine_tune_stopped_before_its_epochs_is_recognised_when_run_again(tmp_path, capsys):
    """Was: the checkpoint recorded the epochs run as 'epochs', so any run stopped early (by the time
    budget, max steps or early stopping) was 'fine-tuned with other settings (epochs 2, not 5)' on a rerun."""
    data = _folder(tmp_path, 3)
    out = tmp_path / "ckpt"
    args = [*_finetune_args("bert4rec:tiny", data, out), "--epochs", "5"]  # stops at --max-steps 2 first
    assert main(args) == 0
    training = load_checkpoint(out).meta["training"]
    assert training["epochs"] == 5 and 1 <= training["epochs_run"] < 5, training
    capsys.readouterr()
    assert main(args) == 0
    assert "already holds this fine-tuned" in capsys.readouterr().out


def test_finetune_into_an_empty_folder_and_never_into_a_users_folder(tmp_path, capsys):
    data = _folder(tmp_path, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_finetune_args("bert4rec:tiny", data, empty)) == 0
    assert is_checkpoint(empty)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    for extra in ((), ("--fresh",)):
        assert main(_finetune_args("bert4rec:tiny", data, mine, *extra)) == 2
        assert "pick another -o" in _one_error_line(capsys)
    assert (mine / "notes.txt").read_text() == "my notes" and not is_checkpoint(mine)


# --------------------------------------------------------------- finding 2
def test_a_checkpoint_is_refused_on_other_data_than_it_was_fine_tuned_on(tmp_path, capsys):
    data_dir, other_dir = _folder(tmp_path, 3), _folder(tmp_path, 4)
    data, other = read_movielens_folder(data_dir), read_movielens_folder(other_dir)
    result = finetune("bert4rec:tiny", data, FinetuneConfig(epochs=1, max_steps=2, max_minutes=None, precision="fp32"))
    ckpt = load_checkpoint(save_checkpoint(result, tmp_path / "ckpt"))
    assert real_data_setup(data, ckpt, 8, quick=True)["count"] == 30  # its own data: fine
    with pytest.raises(ArtifactError, match=f"fine-tuned on ml-100k from {data_dir}.*--data {data_dir}"):
        real_data_setup(other, ckpt, 8, quick=True)
    # from the command line: one line, exit 2, before any benchmark runs
    report = tmp_path / "report"
    args = ["bench", str(ckpt.path), "--data", str(other_dir), "--runtimes", "eager", "--batch-sizes", "8",
            "--quick", "--no-memory", "--threads", "1", "-p", "O1", "-o", str(report)]
    assert main(args) == 2
    assert "was fine-tuned on" in _one_error_line(capsys) and not report.exists()


# --------------------------------------------------------------- finding 3
@pytest.mark.parametrize("files, where", [
    ({"u.data": "1\t2\t5\t100\n1\t3\t4\tnotatime\n"}, "u.data line 2"),
    ({"ml-100k.inter": "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t2\n"}, "ml-100k.inter line 3"),
])
def test_malformed_data_lines_are_named_errors(tmp_path, capsys, files, where):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=f"{where}: expected .*; fix or delete that line"):
        read_movielens_folder(tmp_path)
    assert main(_finetune_args("bert4rec:tiny", tmp_path, tmp_path / "out")) == 2
    assert where in _one_error_line(capsys)


@pytest.mark.parametrize("name, text, where", [
    ("u.data", "1\t2\tfive\t100\n", "u.data line 1"),
    ("ml-100k.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t5\n", "ml-100k.inter line 2"),
])
def test_malformed_click_data_lines_are_named_errors(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    stem = "u" if name == "u.data" else "ml-100k"
    sep = "|" if stem == "u" else "\t"
    user = "1|30|M|student|12345\n" if stem == "u" else "user_id:token\tage:token\toccupation:token\tzip_code:token\n1\t30\tstudent\t12345\n"
    (tmp_path / f"{stem}.user").write_text(user)
    (tmp_path / f"{stem}.item").write_text(f"2{sep}A{sep}x{sep}{sep}x{sep}1\n" if stem == "u" else "item_id:token\tclass:token_seq\n2\tDrama\n")
    with pytest.raises(DataError, match=f"{where}: expected .*; fix or delete that line"):
        read_clicks_folder(tmp_path)


# --------------------------------------------------------------- finding 4
@pytest.mark.parametrize("model, extra, said", [
    ("bert4rec:tiny", ("--seq-len", "100000"), f"pass --seq-len {MAX_SEQ_LEN} or less"),
    ("gpt-rec:tiny", ("--seq-len", str(MAX_SEQ_LEN + 1)), "outgrow memory in attention"),
    ("bert4rec:huge", (), "no size 'huge'"),
    ("two-tower:huge", (), "no size 'huge'"),
])
def test_settings_the_model_cannot_take_are_refused_before_the_data_loads(tmp_path, capsys, model, extra, said):
    # a data folder that does not exist: refusing the settings first is what says it was not loaded
    assert main(_finetune_args(model, tmp_path / "no-such-data", tmp_path / "out", *extra)) == 2
    line = _one_error_line(capsys)
    assert said in line and "no such data folder" not in line, line


def test_the_finetune_api_refuses_too_long_histories():
    with pytest.raises(SpecError, match="outgrow memory in attention"):
        finetune("bert4rec:tiny", synthetic_movielens(users=8, items=20, interactions=100),
                 FinetuneConfig(seq_len=MAX_SEQ_LEN + 1, max_minutes=None, max_steps=1))


# --------------------------------------------------------------- finding 5
def test_recorded_metrics_are_the_saved_fp32_weights_not_the_autocast_ones():
    small = synthetic_movielens(users=64, items=100, interactions=1300, seed=0)
    config = FinetuneConfig(epochs=1, max_minutes=None, batch_size=16, lr=5e-3, seed=0, precision="bf16",
                            dropout=0.0, patience=10, threads=1)
    result = finetune("bert4rec:tiny", small, config)
    objective, split = get_objective("bert4rec"), small.leave_one_out()
    bf16 = objective.evaluate(result.model, split, "test", result.seq_len, result.model_config, "bf16",
                              torch.device("cpu"))
    with torch.no_grad():  # the saved weights, as bench's eager fp32 reference runs them
        fp32 = {part: evaluate_ranking(lambda i, m: result.model(i, m), getattr(split, part), split.num_items,
                                       seq_len=result.seq_len, append_mask=result.append_mask)
                for part in ("valid", "test")}
    assert bf16["ndcg@10"] != fp32["test"]["ndcg@10"], "bf16 ranks like fp32 here: the test shows nothing"
    assert result.test == {k: v for k, v in fp32["test"].items() if k != "users"}
    assert result.valid == {k: v for k, v in fp32["valid"].items() if k != "users"}


# --------------------------------------------------------------- finding 6
def test_asked_for_synthetic_data_is_not_said_to_be_a_fallback(tmp_path):
    data = synthetic_movielens(users=8, items=20, interactions=100)
    assert data.notice and "SYNTHETIC" in data.notice and "not found" not in data.notice
    assert "not found" in SYNTHETIC_NOTICE  # the fallback's notice (load_movielens) says why
    out = tmp_path / "ckpt"
    result = finetune("bert4rec:tiny", data, FinetuneConfig(epochs=1, max_steps=1, max_minutes=None, precision="fp32"))
    save_checkpoint(result, out)
    assert "not found" not in json.loads((out / "graphopt-checkpoint.json").read_text())["data"]["notice"]


def test_finetune_of_a_folder_says_zoo_models_only(tmp_path, capsys):
    """Was: 'cannot fine-tune 'models/gpt2'; fine-tunable models: bert4rec, ...' for a Hugging Face folder."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert main(["finetune", str(folder), "--data", "synthetic", "-o", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert f"cannot fine-tune {folder}: graphopt fine-tunes zoo models only" in line
    assert "can be optimized, benchmarked and tuned as it is" in line
