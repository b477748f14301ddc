"""The Os/Oz presets (optimize for size): tables stored as 8/4-bit codes with fp16
per-row scale/offset, looked up as gather + per-row dequantize; int8 linear
weights. Structure, the per-row error bound, the artifacts on ONNX Runtime and
Inductor (numerics and size), and the ONNX TensorRT would get."""

from __future__ import annotations

import pytest
import torch
from graphopt.passes.quantize_embeddings import TOLERANCE, dequantize_rows
from torch import nn

import graphopt
from graphopt.bench.variants import dir_size
from graphopt.metrics import topk_overlap
from graphopt.rec.zoo.dlrm import DLRM, sparse_sampler
from graphopt.transform.pipeline import parse_pipeline

#: a DLRM with one large bag table, one mid-size table and one below Os's 1,024-row threshold
CFG = dict(dense=4, tables=[32768, 2048, 50], dim=32, bag=3, bottom=[16, 32], top=[16, 1])
FP32_TABLE_BYTES = (32768 + 2048) * 32 * 4


def _inputs(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CFG["dense"], generator=g), sparse_sampler(CFG)(batch, g)


@pytest.fixture(scope="module")
def ctr():
    torch.manual_seed(0)
    model = DLRM(CFG).eval()
    return graphopt.capture(model, _inputs(8, 0), dynamic={"dense": {0: "batch"}, "sparse": {0: "batch"}},
                            input_ranges={"sparse": (0, 50)}, name="ctr")


@pytest.fixture(scope="module")
def small(ctr):
    """``small[preset] -> (Program, OptimizeReport)`` for Os and Oz, built once."""
    return {p: graphopt.optimize(ctr, p) for p in ("Os", "Oz")}


def test_presets_are_o2_with_the_size_passes_before_linear_act_fusion():
    o2 = [p.name for p in parse_pipeline("O2")]
    for preset, bits in (("Os", 8), ("Oz", 4)):
        steps = list(parse_pipeline(preset))
        names = [p.name for p in steps]
        assert set(o2) <= set(names) and names.index("quantize-int8-weights") < names.index("fuse-linear-act")
        q = steps[names.index("quantize-embeddings")]
        assert (q.bits, q.min_rows) == (bits, 1024)
        assert str(parse_pipeline(str(parse_pipeline(preset)))) == str(parse_pipeline(preset))


@pytest.mark.parametrize("preset,bits", [("Os", 8), ("Oz", 4)])
def test_tables_are_stored_as_codes_with_per_row_scales(ctr, small, preset, bits):
    q, report = small[preset]
    rec = {p.name: p for p in report.passes}
    assert rec["quantize-embeddings"].stats == {"embedding": 2}  # the two large tables, after O2's bag -> gather
    assert any("below min_rows 1024" in d for d in rec["quantize-embeddings"].declined)  # the 50-row table
    assert rec["quantize-int8-weights"].stats == {"linear": 4}
    params = q.parameter_tensors()
    codes = {k: v for k, v in params.items() if v.dtype == torch.uint8}
    scales = {k: v for k, v in params.items() if k.endswith("_scale_offset")}
    width = 32 if bits == 8 else 16  # 4-bit: two codes per byte
    assert sorted(tuple(v.shape) for v in codes.values()) == [(2048, width), (32768, width)]
    assert sorted(tuple(v.shape) for v in scales.values()) == [(2048, 2), (32768, 2)]
    assert all(v.dtype == torch.float16 for v in scales.values())
    assert not [k for k, v in params.items() if v.dtype == torch.float32 and v.dim() == 2 and v.shape[0] >= 1024]
    assert sum(v.dtype == torch.int8 for v in params.values()) == 4  # the linear weights
    # gather + per-row dequantize: each code gather is cast to float, scaled and offset by gathered row scales
    gathers = [n for n in q.graph.nodes if n.target is torch.ops.aten.embedding.default
               and n.args[0].op == "get_attr" and n.args[0].target in codes]
    assert len(gathers) == 2
    for g in gathers:
        (cast,) = g.users
        assert cast.target is torch.ops.aten._to_copy.default and cast.kwargs["dtype"] == torch.float32
    ops = q.op_histogram()
    assert ops["quantized_decomposed.dequantize_per_channel.default"] == 4
    assert "aten.embedding_bag.padding_idx" not in ops and "aten.embedding_bag.default" not in ops
    expected = FP32_TABLE_BYTES - sum(d["bytes_before"] - d["bytes_after"] for d in rec["quantize-embeddings"].details)
    assert sum(v.numel() * v.element_size() for k, v in params.items() if k in codes or k in scales) == expected


@pytest.mark.parametrize("bits,dim", [(8, 24), (4, 25)])  # an odd width exercises the 4-bit pad column
def test_error_is_within_half_a_row_scale_per_element(bits, dim):
    """|lookup - fp32| <= scale/2 per looked-up element; a bag of 4 sums at most 4 such errors."""

    class Lookups(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(3000, dim)
            self.bag = nn.EmbeddingBag(3000, dim, mode="sum")

        def forward(self, ids, bags):
            return self.emb(ids), self.bag(bags)

    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    ids, bags = torch.randint(0, 3000, (64,), generator=g), torch.randint(0, 3000, (64, 4), generator=g)
    ref = graphopt.capture(Lookups().eval(), (ids, bags), dynamic=False)
    q, report = graphopt.optimize(ref, f"embedding-bag-to-gather,quantize-embeddings{{bits={bits} min_rows=1024}}")
    assert report.passes[1].stats == {"embedding": 2}
    scales = {k.removesuffix("_scale_offset"): v[:, 0].float() for k, v in q.parameter_tensors().items()
              if k.endswith("_scale_offset")}
    emb_scale, bag_scale = scales["model_emb_weight"], scales["model_bag_weight"]
    (out_emb, out_bag), (want_emb, want_bag) = q(ids, bags), ref(ids, bags)
    slack = 1e-5  # fp32 rounding of code * scale + offset
    assert ((out_emb - want_emb).abs() <= emb_scale[ids, None] / 2 + slack).all()
    assert ((out_bag - want_bag).abs() <= bag_scale[bags].sum(1, keepdim=True) / 2 + 4 * slack).all()
    # the bound is tight: the worst element uses most of its half step (a wrong scale would break it or be far off)
    assert float(((out_emb - want_emb).abs() / (emb_scale[ids, None] / 2)).max()) > 0.9
    codes = next(v for k, v in q.parameter_tensors().items() if k.startswith("model_emb_weight_q"))
    table = dequantize_rows(codes, q.parameter_tensors()["model_emb_weight_scale_offset"], bits, dim)
    torch.testing.assert_close(out_emb, table[ids], atol=1e-6, rtol=0)  # the graph is a real gather of these rows


def test_os_keeps_the_ranking_of_256_candidates(ctr, small):
    x = _inputs(256, 7)
    want = ctr(*x)[0].flatten()
    for preset in ("Os", "Oz"):
        got = small[preset][0](*x)[0].flatten()
        torch.testing.assert_close(got, want, atol=TOLERANCE[8 if preset == "Os" else 4],
                                   rtol=TOLERANCE[8 if preset == "Os" else 4])
        assert topk_overlap(got, want, 25) >= 0.9


@pytest.fixture(scope="module")
def os_on_ort(small, tmp_path_factory):
    return graphopt.lower(small["Os"][0], "onnxruntime", tmp_path_factory.mktemp("ort") / "os")


def test_onnxruntime_artifact_matches_and_stores_the_small_tables(ctr, small, os_on_ort):
    q, _ = small["Os"]
    x = _inputs(64, 3)
    with graphopt.load(os_on_ort.path) as runner:
        torch.testing.assert_close(runner(*x)[0], q(*x)[0], atol=1e-5, rtol=1e-5)
    # the file holds the quantized parameters, not the fp32 ones: size = parameter bytes + a graph of a few KB
    size, params = dir_size(os_on_ort.path), q.parameter_bytes()
    assert params < ctr.parameter_bytes() / 3.5 and small["Oz"][0].parameter_bytes() < ctr.parameter_bytes() / 6
    assert params <= size < params + 64 * 1024


def test_inductor_artifact_matches_and_holds_no_fp32_table(small, tmp_path):
    q, _ = small["Os"]
    art = graphopt.lower(q, "inductor", tmp_path / "ind")
    x = _inputs(64, 4)
    with graphopt.load(art.path) as runner:
        torch.testing.assert_close(runner(*x)[0], q(*x)[0], atol=1e-4, rtol=1e-4)
    # the compiled library embeds its constants: the 4.5 MB of fp32 tables cannot be in a smaller file
    assert 32768 * 32 <= dir_size(art.path) < FP32_TABLE_BYTES


def test_onnx_for_onnxruntime_gathers_uint8_which_tensorrt_rejects(os_on_ort):
    from graphopt.runtimes.tensorrt_check import check_onnx

    errors = [f for f in check_onnx(os_on_ort.path / "model.onnx") if f.severity == "error"]
    assert len(errors) == 2 and all(f.op == "Gather" and "UINT8" in f.message for f in errors)


def test_tensorrt_onnx_gathers_int32_words_and_passes_the_checker(small):
    ort = pytest.importorskip("onnxruntime")
    from graphopt.runtimes.onnx_export import export_onnx
    from graphopt.runtimes.tensorrt_check import check_onnx

    q, _ = small["Oz"]  # 4-bit: words, then the float nibble unpack (8-bit is the same gather without it)
    model = export_onnx(q, for_tensorrt=True)
    assert [str(f) for f in check_onnx(model) if f.severity == "error"] == []
    words = [t for t in model.graph.initializer if t.name.endswith("_words_table")]
    assert sorted(tuple(t.dims) for t in words) == [(2048, 4), (32768, 4)]  # 32 codes = 16 bytes = 4 words
    assert all(t.data_type == 6 for t in words)  # INT32: four codes per word, same bytes as the uint8 table
    assert not [t for t in model.graph.initializer if t.data_type == 2]  # no UINT8 left
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _inputs(32, 5)
    (out,) = sess.run(None, {name: t.numpy() for name, t in zip(q.input_names, x)})
    torch.testing.assert_close(torch.from_numpy(out), q(*x)[0], atol=1e-5, rtol=1e-5)


def test_tensorrt_words_cover_rows_that_are_not_a_multiple_of_four_bytes():
    ort = pytest.importorskip("onnxruntime")
    from graphopt.runtimes.onnx_export import export_onnx, uint8_gathers_as_words

    emb = nn.Embedding(1500, 25).eval()  # 4-bit: 13 bytes per row, padded to 16 (4 words), sliced back after
    ids = torch.randint(0, 1500, (6, 5), generator=torch.Generator().manual_seed(0))
    q, _ = graphopt.optimize(graphopt.capture(emb, (ids,), dynamic=False), "quantize-embeddings{bits=4}")
    model = export_onnx(q)
    assert uint8_gathers_as_words(model) == 1 and uint8_gathers_as_words(model) == 0  # idempotent: nothing left
    (table,) = [t for t in model.graph.initializer if t.name.endswith("_words_table")]
    assert tuple(table.dims) == (1500, 4)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {q.input_names[0]: ids.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), q(ids)[0], atol=1e-6, rtol=1e-6)
