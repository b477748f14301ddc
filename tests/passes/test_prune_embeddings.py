"""prune-embeddings: smaller item table and head, original item ids in and out."""

from __future__ import annotations

import pytest
import torch
from graphopt.passes.prune_embeddings import DEFAULT_FILL

import graphopt
from graphopt.errors import PassFailedError, PassOptionError
from graphopt.ir.fx import fetch_attr
from graphopt.metrics import allclose_report

ITEMS, HIDDEN = 50, 32  # bert4rec:tiny: ids 0 = pad, 1..50 items, 51 = [mask]; output columns 0..50
KEEP = list(range(1, 31))


def _inputs_with_ids(p, ids_pool, batch=3, seq=10, seed=0):
    ids, mask = p.sample_inputs(batch=batch, seq=seq, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(ids_pool)
    body = pool[torch.randint(0, len(pool), ids.shape, generator=g)]
    return torch.where((ids == 0) | (ids == ITEMS + 1), ids, body), mask


def _table(program) -> torch.Tensor:
    node = next(n for n in program.gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    return fetch_attr(program.gm, node.args[0].target)


def onnx_outputs(program, inputs):
    ort = pytest.importorskip("onnxruntime")
    onx = torch.onnx.export(program.export(), dynamo=True, verbose=False)
    sess = ort.InferenceSession(onx.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})]


def test_tied_table_and_head_shrink_and_ids_stay_original(program):
    p = program("bert4rec:tiny")
    pruned, report = graphopt.optimize(p, "prune-embeddings{keep=1-30}")
    # table: 30 kept items + pad + unknown (zero) row + [mask]
    assert tuple(_table(pruned).shape) == (30 + 3, HIDDEN)
    ops = pruned.op_histogram()
    assert ops["aten.index.Tensor"] == p.op_histogram()["aten.index.Tensor"] + 1  # id remap gather
    assert ops["aten.index_select.default"] == 1  # scores back to the original index space
    removed = (ITEMS + 2) * HIDDEN - 33 * HIDDEN + (ITEMS + 1) - 32 - (ITEMS + 2) - (ITEMS + 1)
    assert p.num_parameters() - pruned.num_parameters() == removed
    assert report.passes[0].details[0]["items_dropped"] == ITEMS - 30
    for batch, seq in ((2, 6), (4, 13)):
        x = _inputs_with_ids(p, KEEP, batch, seq, seed=batch)
        out, ref = pruned(*x)[0], p(*x)[0]
        assert out.shape == ref.shape == (batch, ITEMS + 1)  # original item-id columns
        kept_cols = [0, *KEEP]
        assert allclose_report([out[:, kept_cols]], [ref[:, kept_cols]], 1e-5) is None
        assert (out[:, 31:] == DEFAULT_FILL).all()  # dropped items can never rank
        assert set(out.topk(10).indices.flatten().tolist()) <= set(kept_cols)
    x = _inputs_with_ids(p, KEEP, 3, 9, seed=9)
    assert allclose_report(onnx_outputs(pruned, x), pruned(*x), 1e-4) is None


def test_frequency_file_and_dropped_ids_read_the_unknown_row(program, tmp_path):
    p = program("bert4rec:tiny")
    freq = tmp_path / "counts.tsv"
    freq.write_text("# item count\n" + "".join(f"{i}\t{i % 3}\n" for i in range(1, ITEMS + 1)))
    pruned, report = graphopt.optimize(p, f"prune-embeddings{{keep_file={freq} min_count=1}}")
    kept = [i for i in range(1, ITEMS + 1) if i % 3 >= 1]
    assert tuple(_table(pruned).shape) == (len(kept) + 3, HIDDEN)
    x = _inputs_with_ids(p, list(range(1, ITEMS + 1)), seed=3)  # retired items in the history too
    out = pruned(*x)[0]
    assert out.shape == (3, ITEMS + 1) and torch.isfinite(out).all()


def test_named_untied_table(program):
    p = program("two-tower:tiny")
    pruned, report = graphopt.optimize(p, "prune-embeddings{keep=0-99 tables=model.item_emb}")
    assert report.passes[0].details[0]["rows_after"] == 101
    x = p.sample_inputs(batch=4, seed=1)
    x = (x[0], x[1], x[2] % 100)  # candidates among kept items: scores unchanged
    assert allclose_report(pruned(*x), p(*x), 1e-5) is None


def test_near_miss_no_tied_head(program):
    _, report = graphopt.optimize(program("dlrm:tiny"), "prune-embeddings{keep=1-10}")
    assert report.passes[0].modified is False
    assert report.passes[0].declined


@pytest.mark.parametrize("text", ["prune-embeddings", "prune-embeddings{keep=a-b}",
                                  "prune-embeddings{keep_file=/nonexistent/ids.txt}"])
def test_bad_options(text):
    with pytest.raises(PassOptionError):
        graphopt.parse_pipeline(text)


def test_keeping_every_item_is_exact(program):
    p = program("bert4rec:tiny")
    pruned, _ = graphopt.optimize(p, f"prune-embeddings{{keep=0-{ITEMS}}}")
    x = p.sample_inputs(batch=2, seq=7, seed=5)
    assert allclose_report(pruned(*x), p(*x), 1e-5) is None


@pytest.mark.parametrize("model,text,message", [
    ("two-tower:tiny", "prune-embeddings{tables=model.item_emb keep=500-600}",
     r"option 'keep': 101 ids \(500\.\.600\) are beyond model\.item_emb's 200 rows; keep ids in \[0, 199\]$"),
    ("bert4rec:tiny", "prune-embeddings{keep=51}",  # 51 is [mask], outside the head's items 0..50
     r"option 'keep': none of .*'s items \[0, 50\] is kept, which would drop the whole table; keep ids in that range$"),
    ("two-tower:tiny", "prune-embeddings{tables=item_emb keep=1-50}",
     r"option 'tables': no embedding table named item_emb; name tables by module path or parameter name "
     r"\(tables here: model\.history \(EmbeddingBag\), model\.item_emb, model\.user_emb\)$"),
    ("dlrm:tiny", "prune-embeddings{tables=model.tables.1 keep=1-10}",
     r"option 'tables': model\.tables\.1 is an EmbeddingBag table, which this pass does not prune; name "
     r"aten\.embedding tables \(tables here: model\.tables\.0 \(EmbeddingBag\), .*model\.tables\.3 \(EmbeddingBag\)\)$"),
])
def test_keep_and_tables_that_match_nothing_are_refused_in_one_line(program, model, text, message):
    """Was: keep ids past the table silently dropped the whole table (scores off by 0.5), and
    an unmatched tables= name was one generic 'declined' line naming no table."""
    p = program(model)
    before = p.op_histogram()
    with pytest.raises(PassFailedError, match=message) as info:
        graphopt.optimize(p, text)
    assert "\n" not in str(info.value)
    assert p.op_histogram() == before  # nothing half-pruned
