"""graphopt.pruning: coupled groups, importance, selection, recovery."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import PassOptionError, PreconditionError
from graphopt.passlib.pruning import (
    PruneGroup,
    find_channel_groups,
    find_head_groups,
    group_importance,
    recover,
    select_removals,
    taylor_saliency,
)


def test_head_groups_couple_qkv_rows_and_output_columns(program):
    p = program("bert4rec:tiny")
    groups, declined = find_head_groups(p.gm)
    assert [(g.size, g.width) for g in groups] == [(4, 8), (4, 8)] and not declined
    g = groups[0]
    assert g.name == "model.bert.encoder.layer.0.attention.self"
    # Q, K, V weight + bias rows, output projection columns
    assert sorted((s.dim, s.arg) for s in g.slices) == [(0, 1)] * 3 + [(0, 2)] * 3 + [(1, 1)]
    # the literal head count in view(sdpa, [b, 4, s, 8]) is recorded; -1 entries are not
    assert [(e.index, e.per_channel) for e in g.edits] == [(1, 1)]


def test_channel_groups_follow_relu_and_batchnorm_not_cat(program):
    p = program("dlrm:tiny")
    groups, declined = find_channel_groups(p.gm)
    by_name = {g.name: g for g in groups}
    assert set(by_name) == {"model.bottom.0", "model.top.0"}
    bn = [s for s in by_name["model.bottom.0"].slices if not s.score]
    assert len(bn) == 4  # BatchNorm weight, bias, running mean, running var
    assert all(g.kind == "mlp" for g in groups)
    assert any(d.startswith("model.bottom.3") for d in declined)


def test_importance_l1_l2_taylor(program):
    p = program("dlrm:tiny")
    g = next(g for g in find_channel_groups(p.gm)[0] if g.name == "model.top.0")
    w_prod = p.gm.get_parameter("model.top.0.weight")
    with torch.no_grad():
        w_prod[3] = 0.0
    l1 = group_importance(p.gm, g, "l1")
    l2 = group_importance(p.gm, g, "l2")
    assert l1.shape == (16,) and (l1 >= l2 - 1e-12).all()
    assert int(l1.argmin()) == 3 or float(l1[3]) < float(l1.median())
    batches = [p.sample_inputs(batch=4, seed=s) for s in range(2)]
    targets = [s.node.args[s.arg].target for s in g.slices if s.score]
    sal = taylor_saliency(p.gm, targets, batches)
    taylor = group_importance(p.gm, g, "taylor", sal)
    assert taylor.shape == (16,) and (taylor >= 0).all() and float(taylor.sum()) > 0
    assert all(p.gm.get_parameter(t).grad is None for t in targets)
    with pytest.raises(PreconditionError, match="calibration"):
        taylor_saliency(p.gm, targets, [])


def test_select_removals_layer_and_global():
    groups = [PruneGroup("a", "heads", 4, 8), PruneGroup("b", "heads", 4, 8)]
    scores = [torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])]
    assert select_removals(groups, scores, 0.5, "layer") == [[1, 3], [0, 1]]
    # global: normalized per group (a: mean 2.5, b: mean 25) -> the 2 lowest overall
    assert select_removals(groups, scores, 0.25, "global") == [[1], [0]]
    with pytest.raises(PassOptionError, match="would remove all 4"):
        flat, peaked = torch.ones(4), torch.tensor([0.01, 0.01, 0.01, 3.97])
        select_removals(groups, [flat, peaked], 0.875, "global")


def test_recover_distills_towards_the_teacher(program):
    teacher = program("two-tower:tiny")
    pruned, _ = graphopt.optimize(teacher, "prune-linear{ratio=0.5}")
    batches = [teacher.sample_inputs(batch=8, seed=s) for s in range(2)]
    flags = {n: p.requires_grad for n, p in pruned.gm.named_parameters()}
    result = recover(pruned, teacher, batches, steps=20, lr=5e-3)
    assert result["loss_after"] < 0.5 * result["loss_before"]
    # training state is undone: no gradients kept, requires_grad as it was before
    assert all(p.grad is None for p in pruned.gm.parameters())
    assert {n: p.requires_grad for n, p in pruned.gm.named_parameters()} == flags
    pruned.gm.graph.lint()
    assert pruned(*batches[0])[0].shape == teacher(*batches[0])[0].shape
