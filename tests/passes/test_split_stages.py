"""split-stages: partition into contiguous, balanced, cheaply-cut stages."""

from __future__ import annotations

import pytest
import torch

from graphopt import optimize
from graphopt.errors import PassFailedError, PassOptionError, PreconditionError
from graphopt.ir.fx import is_op
from graphopt.passlib.costs import node_flops
from graphopt.passlib.partition import (
    STAGE_META,
    StagePartition,
    compute_nodes,
    cut_table,
    run_stages,
    split_program,
    stage_partition,
)
from tests.passes._helpers import assert_equivalent

TOL = 1e-5
aten = torch.ops.aten


def _positions(program) -> list[int]:
    marks = [n.meta[STAGE_META] for n in compute_nodes(program.gm)]
    assert marks == sorted(marks), "stages must be contiguous in graph order"
    return [i for i in range(1, len(marks)) if marks[i] != marks[i - 1]]


def _assert_stages_equal_program(program, positions, shapes) -> None:
    stages = split_program(program, positions)
    for stage in stages:
        stage.gm.graph.lint()
    for batch, seq in shapes:
        inputs = program.sample_inputs(batch=batch, seq=seq, seed=5)
        for out, ref in zip(run_stages(stages, inputs), program(*inputs)):
            torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)


def test_two_stages_on_bert4rec(program):
    before = program("bert4rec:tiny")
    after, report = optimize(before, "split-stages")
    record = report.passes[0]
    assert record.modified
    assert record.ops_delta() == {}  # only annotates: the graph keeps every op
    assert all(STAGE_META in n.meta for n in after.gm.graph.nodes)
    positions = _positions(after)
    assert len(positions) == 1
    partition = stage_partition(after)
    assert partition.n == 2 and len(partition.cuts) == 1
    # the one record split-stages wrote: its options and the node ending stage 0
    order = compute_nodes(after.gm)
    assert partition == StagePartition(n=2, cuts=(order[positions[0] - 1].name,), balance="params", slack=0.1)
    assert partition.positions(after) == positions
    assert stage_partition(after.copy()) == partition
    # per-stage report: weights, FLOPs, and what crosses the cut
    assert [d["stage"] for d in record.details] == [0, 1]
    assert all(d["parameter_bytes"] > 0 and d["flops"] > 0 for d in record.details)
    assert record.details[0]["sends"] and record.details[0]["send_bytes"] > 0
    assert record.details[1]["sends"] == []
    # the item table is tied to the scoring head: both stages hold it, and the report says so
    tied = "model.bert.embeddings.word_embeddings.weight"
    assert tied in record.details[0]["shared_weights"] and tied in record.details[1]["shared_weights"]
    assert_equivalent(before, after, TOL)
    _assert_stages_equal_program(after, positions, [(None, None), (3, 9)])


def test_flops_balance_and_cheap_cuts(program):
    after, report = optimize(program("bert4rec:tiny"), "split-stages{n=3 balance=flops slack=0.1}")
    flops = [d["flops"] for d in report.passes[0].details]
    assert len(flops) == 3 and max(flops) <= 1.5 * min(flops), flops
    # within the slack window around each equal share, no splittable cut crosses fewer bytes;
    # where no cut falls in the window, the cut is the one closest to the share
    order = compute_nodes(after.gm)
    prefix = [0]
    for node in order:
        prefix.append(prefix[-1] + node_flops(node))
    window = 0.1 * prefix[-1] / 3
    cuts = {c.position: c for c in cut_table(after)}
    for k, position in enumerate(_positions(after), start=1):
        target = prefix[-1] * k / 3
        valid = [c for c in cuts.values() if c.splittable]
        near = [c for c in valid if abs(prefix[c.position] - target) <= window]
        if near:
            assert cuts[position].bytes == min(c.bytes for c in near)
        else:
            assert abs(prefix[position] - target) == min(abs(prefix[c.position] - target) for c in valid)
    _assert_stages_equal_program(after, _positions(after), [(2, 7)])


def test_dlrm_embeddings_on_their_own_stage(program):
    before = program("dlrm:tiny")
    after, report = optimize(before, "split-stages{n=3 embeddings_stage=true balance=memory}")
    assert report.passes[0].modified
    order = compute_nodes(after.gm)
    positions = _positions(after)
    first = [n for n in order if n.meta[STAGE_META] == 0]
    rest = [n for n in order if n.meta[STAGE_META] > 0]
    assert sum(is_op(n, aten.embedding_bag, aten._embedding_bag) for n in first) == 4
    assert not any(is_op(n, aten.embedding_bag, aten._embedding_bag) for n in rest)
    assert not any(is_op(n, aten.linear) for n in first)  # both MLPs moved past the tables
    details = report.passes[0].details
    assert details[0]["parameter_bytes"] == (100 + 80 + 60 + 40) * 8 * 4  # the four tables, float32
    assert_equivalent(before, after, TOL)
    _assert_stages_equal_program(after, positions, [(None, None), (1, None), (5, None)])


def test_unsplittable_points_are_explained(program):
    cuts = cut_table(program("dlrm:tiny"))
    reasons = [c.reason for c in cuts if not c.splittable]
    assert any("tuple, not a tensor" in r for r in reasons)  # between embedding_bag and its getitem
    assert any(c.splittable for c in cuts)


def test_more_stages_than_splittable_points_fails_clearly(program):
    p = program("dlrm:tiny")
    splittable = sum(c.splittable for c in cut_table(p))
    with pytest.raises(
        PassFailedError, match=rf"only {splittable} splittable points; use n <= {splittable + 1}"
    ):
        optimize(p, f"split-stages{{n={splittable + 2}}}")


def test_option_errors():
    from graphopt.transform.pipeline import parse_pipeline

    with pytest.raises(PassOptionError, match="embeddings_stage=true needs n >= 2"):
        parse_pipeline("split-stages{n=1 embeddings_stage=true}")
    with pytest.raises(PassOptionError, match="must be at least 1"):
        parse_pipeline("split-stages{n=0}")
    with pytest.raises(PassOptionError, match="not one of"):
        parse_pipeline("split-stages{balance=bytes}")


def test_near_miss_one_stage_does_not_fire(program):
    p = program("bert4rec:tiny")
    after, report = optimize(p, "split-stages{n=1}")
    assert report.passes[0].modified is False
    assert stage_partition(after) is None
    assert not any(STAGE_META in n.meta for n in after.gm.graph.nodes)


def test_near_miss_same_partition_twice_does_not_fire(program):
    once, _ = optimize(program("dlrm:tiny"), "split-stages{balance=flops}")
    twice, report = optimize(once, "split-stages{balance=flops}")
    assert report.passes[0].modified is False
    assert stage_partition(twice) == stage_partition(once)


def test_partition_that_no_longer_fits_names_the_pass(program):
    after, _ = optimize(program("dlrm:tiny"), "split-stages")
    stale = StagePartition(n=2, cuts=("no_such_node",))
    with pytest.raises(PreconditionError, match=r"node no_such_node is gone.*'split-stages\{n=2\}'"):
        stale.positions(after)


# ------------------------------------------------------------------ memory-aware partitioning
LAYER = 256 * 256 * 4 + 256 * 4  # one Linear(256, 256): weight + bias, float32


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(256, 256) for _ in range(4))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 3 else torch.relu(layer(x))
        return x


@pytest.fixture(scope="module")
def mlp():
    import graphopt

    torch.manual_seed(0)
    return graphopt.capture(_MLP().eval(), {"x": torch.randn(2, 256)}, dynamic={"x": {0: "batch"}}, name="mlp")


def _stage_layers(program) -> list[int]:
    counts: dict[int, int] = {}
    for n in compute_nodes(program.gm):
        if is_op(n, aten.linear):
            counts[n.meta[STAGE_META]] = counts.get(n.meta[STAGE_META], 0) + 1
    return [counts.get(k, 0) for k in range(max(counts) + 1)]


def test_max_memory_picks_the_fewest_stages_that_fit(mlp, tmp_path):
    from graphopt.runtimes.stages import lower_stages, run_sequential

    from graphopt.transform.memory import analyze_memory

    whole = analyze_memory(mlp).at(batch=2)
    assert whole.weights == 4 * LAYER and whole.total > 10**6  # n=1 does not fit in 1MB
    after, report = optimize(mlp.copy(), "split-stages{max_memory=1MB batch=2}")
    record = report.passes[0]
    assert record.stats == {"stages": 2, "cuts": 1}
    assert _stage_layers(after) == [2, 2]
    assert all(d["memory_bytes"] <= 10**6 for d in record.details)
    assert [d["parameter_bytes"] for d in record.details] == [2 * LAYER, 2 * LAYER]
    assert any("memory per stage at batch=2" in note for note in record.notes)
    # a tighter budget needs one layer per stage
    four, report = optimize(mlp.copy(), "split-stages{max_memory=300KB batch=2}", verify_each=False)
    assert report.passes[0].stats["stages"] == 4 and _stage_layers(four) == [1, 1, 1, 1]
    # the stages runtime lowers and runs the result like the Program
    artifact = lower_stages(after, tmp_path / "mlp")
    inputs = mlp.sample_inputs(batch=3, seed=1)
    torch.testing.assert_close(run_sequential(artifact.path, inputs)[0], mlp(*inputs)[0], atol=TOL, rtol=TOL)


def test_max_memory_that_nothing_fits_says_the_smallest_need(mlp):
    with pytest.raises(PassFailedError, match=r"stages of at most 195.3 KiB at batch=2: the smallest per-stage "
                                              r"need \(weights \+ activation peak\) is 26\d\.\d KiB, the stage around node "
                                              r"(linear|relu)\w*, even with \d+ stages"):
        optimize(mlp.copy(), "split-stages{max_memory=200KB batch=2}")


def test_max_memory_near_miss_whole_program_fits(mlp):
    after, report = optimize(mlp.copy(), "split-stages{max_memory=2MB}")
    assert report.passes[0].modified is False and stage_partition(after) is None
    assert "one stage" in report.passes[0].notes[-1]


def test_memory_balance_minimises_the_largest_stage(program):
    from graphopt.passlib.stage_memory import stage_needs
    from graphopt.transform.memory import analyze_memory

    p = program("bert4rec:tiny")
    after, report = optimize(p, "split-stages{n=3 balance=memory batch=32 seq=64}")
    needs = [d["memory_bytes"] for d in report.passes[0].details]
    # no other choice of 2 splittable cuts has a smaller largest stage (exhaustive over the cut table)
    table = stage_needs(p, analyze_memory(p), 32, 64)
    valid = [c.position for c in cut_table(p) if c.splittable]
    n_nodes = len(table.order)
    need = {}  # (a, b, first) -> weights + peak of order[a:b], every stage start, grown one node at a time
    for a in [0, *valid]:
        for first in {a == 0}:
            seen, weights, peak = set(), 0, 0
            for b in range(a + 1, n_nodes + 1):
                for key, size in table.reads[b - 1]:
                    weights += size if key not in seen else 0
                    seen.add(key)
                peak = max(peak, table.activations[b - 1] + (0 if first else table.inputs[b - 1]))
                need[a, b, first] = weights + peak
    best = min(max(need[0, i, True], need[i, j, False], need[j, n_nodes, False])
               for i in valid for j in valid if i < j)
    assert max(needs) == best
    _assert_stages_equal_program(after, _positions(after), [(32, 64)])


def test_max_memory_option_errors():
    from graphopt.transform.pipeline import parse_pipeline

    with pytest.raises(PassOptionError, match="max_memory picks the number of stages; drop n"):
        parse_pipeline("split-stages{n=3 max_memory=2GB}")
    with pytest.raises(PassOptionError, match="not a size like 2GB"):
        parse_pipeline("split-stages{max_memory=lots}")
    text = str(parse_pipeline("split-stages{max_memory=2GB seq=200}"))
    assert "max_memory=2GB" in text and "seq=200" in text and parse_pipeline(text) == parse_pipeline(text)


def test_max_memory_cuts_by_memory_when_the_balance_cuts_do_not_fit(program):
    p = program("bert4rec:tiny")
    by_params = optimize(p.copy(), "split-stages{n=2 batch=32 seq=64}", verify_each=False)[1].passes[0].details
    by_memory = optimize(p.copy(), "split-stages{n=2 balance=memory batch=32 seq=64}", verify_each=False)[1].passes[0].details
    largest_params = max(d["memory_bytes"] for d in by_params)
    budget = max(d["memory_bytes"] for d in by_memory)  # two stages can fit this, params-balanced ones do not
    assert budget < largest_params
    after, report = optimize(p.copy(), f"split-stages{{max_memory={budget} batch=32 seq=64}}")
    record = report.passes[0]
    assert record.stats["stages"] == 2 and all(d["memory_bytes"] <= budget for d in record.details)
    assert f"the params-balanced cuts exceed max_memory={budget}; cut by memory" in record.notes
    _assert_stages_equal_program(after, _positions(after), [(4, 20)])
