"""The harness on CTR models: held-out clicks scored as AUC/logloss, the fidelity bar
and "best" on those metrics, the report's columns, and Os in the default
pipelines of embedding-dominated models only."""

from __future__ import annotations

import math

import pytest
import torch

from graphopt.bench.accuracy import ClickEvalData, evaluate_clicks, make_evaluator
from graphopt.bench.pipelines import DEFAULT_PIPELINES, SIZE_PIPELINE, default_pipelines, embedding_share
from graphopt.bench.report import BenchReport, accuracy_score
from graphopt.errors import GraphoptError


def test_clicks_are_scored_as_auc_and_logloss():
    logits = torch.tensor([0.0, math.log(3.0), 2.0, -1.0])

    def model(rows: torch.Tensor) -> tuple[torch.Tensor]:
        return (logits[rows].unsqueeze(1),)  # one logit per row, (batch, 1)

    data = ClickEvalData([(torch.tensor([0, 1]),), (torch.tensor([2, 3]),)], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    out = evaluate_clicks(model, data)
    assert out["auc"] == pytest.approx(0.75)  # positives {0, 2}, negatives {ln 3, -1}: 0 < ln 3 is the one miss
    expected = (math.log(2) + math.log(4) + math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 4
    assert out["logloss"] == pytest.approx(expected, rel=1e-6)
    assert make_evaluator({"batches": data.batches, "labels": [1, 0, 1, 0]})(model) == out  # routed by 'labels'
    with pytest.raises(GraphoptError, match="3 labels but the batches give 4 scores"):
        evaluate_clicks(model, ClickEvalData(data.batches, torch.tensor([1.0, 0.0, 1.0])))


def test_eval_batches_given_as_dicts_bind_by_the_models_input_names():
    """A dict batch in another key order than the model's inputs is bound by name (it was read in its
    own order: the model scored swapped inputs); a name the model lacks is a one-line error."""
    def model(dense: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor]:
        return ((dense + 10.0 * ids.float()).unsqueeze(1),)

    rows = {"ids": torch.tensor([0, 1, 0, 1]), "dense": torch.tensor([0.5, -0.5, -1.0, 1.0])}
    labels = [0, 1, 0, 1]  # only ids separate the clicks: AUC 1.0 when the model reads them as ids
    score = make_evaluator({"batches": [rows], "labels": labels}, input_names=["dense", "ids"])
    assert score(model)["auc"] == pytest.approx(1.0)
    built = ClickEvalData([rows], torch.tensor(labels, dtype=torch.float))  # built by hand, bound the same
    assert make_evaluator(built, input_names=["dense", "ids"])(model)["auc"] == pytest.approx(1.0)
    assert make_evaluator({"batches": [rows], "labels": labels})(model)["auc"] == pytest.approx(0.75)  # own order
    with pytest.raises(GraphoptError, match=r"eval_data batch 0: missing input 'dense'; the model's inputs are"):
        make_evaluator({"batches": [{"ids": rows["ids"]}], "labels": labels}, input_names=["dense", "ids"])


def _report(evals: dict[str, dict[str, float]], speedups: dict[str, float]) -> BenchReport:
    variants = [{"name": n, "kind": "baseline" if n == "eager" else "graphopt", "status": "ok", "eval": e,
                 "compile_s": 1.0, "size_bytes": 1 << 20, "size_kind": "artifact", "memory": {}, "notes": [],
                 "reason": ""} for n, e in evals.items()]
    results = [{"shape": "b256", "batch": 256, "seq": None, "variant": n, "status": "ok",
                "latency": {"p50_ms": 1.0 / speedups[n], "p99_ms": 2.0 / speedups[n]},
                "speedup": {"speedup": speedups[n], "speedup_p10": speedups[n], "speedup_p90": speedups[n]},
                "accuracy": {"topk_overlap": 0.5, "cosine": 0.9}} for n in evals]  # poor overlap: eval data decides
    return BenchReport("dlrm", 0.0, 1.0, {}, {"k": 10, "timing": {"warmup": 1, "rounds": 2}}, variants, results,
                       eval_reference=dict(evals["eager"]))


def test_best_ctr_variant_keeps_auc_and_logloss_within_the_bar():
    rep = _report({"eager": {"auc": 0.77, "logloss": 0.55},
                   "Os": {"auc": 0.7690, "logloss": 0.5510},       # -0.13%, +0.18%: kept
                   "Oz": {"auc": 0.7700, "logloss": 0.5540},       # logloss 0.73% worse: below the bar
                   "int8": {"auc": 0.7600, "logloss": 0.5500}},    # AUC -1.3%
                  {"eager": 1.0, "Os": 1.5, "Oz": 2.0, "int8": 3.0})
    assert rep.best("b256") == "Os"
    assert rep.fidelity(rep.rows("b256")[2]) == (False, "logloss -0.73% vs eager (bar -0.5%)")
    header, rows = rep.table("b256")
    assert header[5:7] == ["AUC Δ%", "logloss Δ%"]
    assert rows[1][0] == "Os ★" and rows[1][5:7] == ["-0.13%", "-0.18%"]  # negative = worse, for both
    assert rows[2][0] == "Oz ✗" and rows[3][0] == "int8 ✗"
    score, label = accuracy_score(rep.rows("b256")[3], rep.variant("int8"), rep.eval_reference)
    assert label == "AUC vs eager (%)" and score == pytest.approx(-100 * 0.01 / 0.77)


def test_size_pipeline_is_a_default_for_embedding_dominated_models_only(program):
    dlrm = program("dlrm:tiny")
    assert embedding_share(dlrm) > 0.5 and default_pipelines(dlrm) == (*DEFAULT_PIPELINES, SIZE_PIPELINE)
    # near miss: BERT4Rec's item table is tied to its scoring head, so it counts as a dense weight
    bert = program("bert4rec:tiny")
    assert embedding_share(bert) < 0.5 and default_pipelines(bert) == DEFAULT_PIPELINES


def test_bf16_pipelines_are_left_out_where_the_cpu_has_no_bf16_kernels():
    """On an AVX2-only CPU oneDNN runs bf16 as reference code (0.05-0.58x eager): the default
    bench and demo leave those pipelines out and say so; elsewhere, and for named ones, all stay."""
    from graphopt.bench.pipelines import without_bf16

    pipes = list(DEFAULT_PIPELINES)
    assert without_bf16(pipes, bf16_kernels=True) == (pipes, None)
    kept, note = without_bf16(pipes, bf16_kernels=False)
    assert kept == ["O2", "int8=O2,quantize-int8"]
    assert note.startswith("pipelines bf16, int8-bf16 left out: this CPU has no bf16 GEMM kernels")
    assert "-p" in note
    assert without_bf16(["O2", "int8=O2,quantize-int8"], bf16_kernels=False) == (["O2", "int8=O2,quantize-int8"], None)
    # the label decides, not the text: a user's own bf16 pipeline under another label is theirs
    assert without_bf16(["mine=O2,cast{dtype=bf16}"], bf16_kernels=False) == (["mine=O2,cast{dtype=bf16}"], None)


def test_bf16_peers_are_left_out_of_all_peers_where_the_cpu_has_no_bf16_kernels():
    """``--peers`` on an AVX2-only CPU: every peer but the bf16 ones (which a full run spent
    half an hour in), with a note; a CPU with bf16 kernels gets all of them."""
    from graphopt.bench.peers import PEERS, default_peers

    assert default_peers(bf16_kernels=True) == (list(PEERS), None)
    names, note = default_peers(bf16_kernels=False)
    assert names == [p for p in PEERS if "bf16" not in p] and "torch.compile" in names and "torchao-pt2e-int8" in names
    assert note.startswith("peers torch.compile-bf16, torch.compile-bf16-max-autotune, torchao-pt2e-int8-bf16 left out")
    assert "--peer" in note
