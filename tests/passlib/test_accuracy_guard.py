"""The int8 accuracy guard's emulator: each layer int8, bf16 or fp32 as the rewritten graph computes it,
and ``run(set())`` the float model itself (the guard's reference)."""

from __future__ import annotations

import torch
from graphopt.passes.quantize_int8 import _rewritten_copy

from graphopt.ir.fx import fetch_attr
from graphopt.passlib.accuracy_guard import Emulator, LayerPlan
from graphopt.passlib.calibration import observe
from graphopt.passlib.qdq import activation_qparams, find_linears, quantize_weight


def _plans(gm: torch.fx.GraphModule, batches, bf16_out: bool) -> dict[str, LayerPlan]:
    layers, _ = find_linears(gm)
    observers = observe(gm, batches, sorted({layer.act.name for layer in layers}), "minmax")
    plans = {}
    for layer in layers:
        lo, hi = observers[layer.act.name].range()
        plans[layer.node.name] = LayerPlan(layer, activation_qparams(lo, hi), (lo, hi),
                                           quantize_weight(fetch_attr(gm, layer.weight)), torch.uint8, True, bf16_out)
    return plans


def test_emulator_modes_match_the_float_model_and_the_rewritten_program(zoo, program):
    zm, prog = zoo("bert4rec:tiny"), program("bert4rec:tiny")
    gm = prog.gm
    batches = [tuple(zm.make_inputs(batch=8, seed=100 + i).values()) for i in range(2)]
    x = tuple(zm.make_inputs(batch=8, seed=7).values())
    with torch.no_grad():
        ref = gm(*x)[0]
    plans = _plans(gm, batches, bf16_out=True)
    names = list(plans)
    assert len(names) >= 4
    emu = Emulator(gm, plans)
    # every layer fp32 is the float model: the reference the guard scores against (it was all-bf16 before)
    assert torch.equal(emu.run(set(), *x)[0], ref)
    # one layer bf16 moves the outputs by bf16 rounding, no more; int8 moves them further
    one_bf16 = emu.run(set(), *x, bf16={names[0]})[0]
    one_int8 = emu.run({names[0]}, *x)[0]
    bf16_err, int8_err = (one_bf16 - ref).abs().max(), (one_int8 - ref).abs().max()
    assert 0 < bf16_err < 0.05 * ref.abs().max()
    assert int8_err > 0
    # the emulator computes what the rewritten Program computes, layer by layer; what it leaves out is
    # the rewritten graph's bf16 between the layers (attention), so: close, not equal (stated tolerance)
    for enabled, bf16 in (({names[0]}, set()), (set(names[1:]), {names[0]}), (set(), set(names))):
        emulated = emu.run(enabled, *x, bf16=bf16)[0]
        real = _rewritten_copy(gm, plans, enabled, bf16)(*x)[0]
        assert torch.allclose(real.float(), emulated, atol=0.05, rtol=0.05), (enabled, bf16)
    # the copy the guard scores leaves the Program's own graph untouched
    with torch.no_grad():
        assert torch.equal(gm(*x)[0], ref)
