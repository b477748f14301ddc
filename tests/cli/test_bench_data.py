"""`graphopt bench CHECKPOINT --data ml-100k`: a fine-tuned model judged on its own data from the command line
(real MovieLens-100K inside recbole, a real fine-tune, the real int8 pass and guard). Timings are never asserted."""

from __future__ import annotations

import json

import pytest
import torch

from graphopt.cli import main
from graphopt.rec.data import evaluate_ranking
from graphopt.rec.finetune import load_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "b4r"
    args = ["finetune", "bert4rec:tiny", "--data", "ml-100k", "-o", str(folder), "--max-steps", "6", "--epochs", "1",
            "--threads", "1"]
    assert main(args) == 0
    return folder


def test_bench_judges_a_checkpoint_on_its_test_users_and_guards_int8_on_validation(checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["bench", str(checkpoint), "--data", "ml-100k", "--eval-users", "64", "--runtimes", "eager",
            "--batch-sizes", "8", "--quick", "--no-memory", "--threads", "1", "-p", "int8=O2,quantize-int8", "-o", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    ckpt = load_checkpoint(checkpoint)
    # the reference metrics are the checkpoint's HR@10/NDCG@10 on the first 64 real test users, computed here apart
    from graphopt.cli.finetune import load_data

    split = load_data("ml-100k").leave_one_out()
    seq = int(ckpt.model_config["seq"])
    with torch.no_grad():
        ref = evaluate_ranking(lambda i, m: ckpt.model(i, m), split.test.subset(64), split.num_items, seq_len=seq,
                               append_mask=ckpt.append_mask, batch_size=8, fixed_batch=True)
    assert report["eval_reference"]["hr@10"] == pytest.approx(ref["hr@10"], abs=1e-6)
    assert report["eval_reference"]["ndcg@10"] == pytest.approx(ref["ndcg@10"], abs=1e-6)
    assert {r["seq"] for r in report["results"]} == {seq}  # the checkpoint's history length, not --seq-lens' 64
    variants = {v["name"]: v for v in report["variants"]}
    int8 = variants["int8 @ eager"]
    assert int8["status"] == "ok" and {"hr@10", "ndcg@10"} <= set(int8["eval"])
    # the users whose hit int8 changed, net of each other, are its HR@10 change on the 64 users
    changes = int8["eval_users"]
    assert changes["gained"] - changes["lost"] == round((int8["eval"]["hr@10"] - ref["hr@10"]) * 64), changes
    assert "users gained / lost" in (out / "report.md").read_text()
    # the guard held the validation users' metrics (never the test ones), and the report says so
    assert any(n.startswith("accuracy guard: validation data checked") for n in int8["notes"]), int8["notes"]


def test_bench_data_needs_a_checkpoint(capsys):
    assert main(["bench", "bert4rec:tiny", "--data", "ml-100k", "--runtimes", "eager", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not one" in err[0] and "graphopt finetune" in err[0], err
