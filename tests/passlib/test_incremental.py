"""graphopt.passlib.incremental: prefill/step derived from a causal Program.

Structure (what the step graph reads and returns), numerics against an
independent reference (transformers' GPT2Model under a sliding-window mask,
every step of a 100-step replay within 1e-4 in fp32, a batch of users with
different history lengths, sliding far past max_history), the naive
alternative (re-encoding the last W events) shown to differ, the state-dtype
options' fidelity, and near-misses that must be refused.
"""

from __future__ import annotations

import pytest
import torch

from graphopt.errors import PreconditionError
from graphopt.ir.fx import is_op
from graphopt.metrics import topk_overlap
from graphopt.passlib.incremental import analyze, derive_incremental
from tests._incremental import WINDOW, band_reference, derived, histories, last_window, new_events, optimized

aten = torch.ops.aten
LENGTHS = [5, 3, 1]  # users with different history lengths, left-padded, all below the window


def _replay(inc, steps: int, seed: int = 0, two_at: int = 40):
    """Prefill LENGTHS, then ``steps`` steps of one new event each (two at step ``two_at``);
    yields (step, scores, ids, mask) with the full history so far."""
    ids, mask = histories(LENGTHS, seed)
    n = len(inc.scores)
    out = inc.prefill(ids, mask)
    yield -1, out[0], ids, mask
    state = out[n:]
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        new = new_events(len(LENGTHS), 2 if t == two_at else 1, gen)
        out = inc.step(new, *state)
        state = out[n:]
        ids = torch.cat([ids, new], 1)
        mask = torch.cat([mask, torch.ones_like(new)], 1)
        yield t, out[0], ids, mask


def test_step_graph_structure():
    inc = derived()
    layers = 2  # gpt-rec:tiny
    assert inc.step.input_names == ["input_ids", "past_length"] + [
        f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    assert inc.step.output_names == ["output", "length", "key_0", "value_0", "key_1", "value_1"]
    assert inc.prefill.input_names == ["input_ids", "attention_mask"]
    assert inc.prefill.output_names == inc.step.output_names
    for program in (inc.prefill, inc.step):
        assert sum(is_op(n, aten.scaled_dot_product_attention) for n in program.graph.nodes) == layers
        program.graph.lint()
    # the step concatenates each layer's cached keys and values with the new ones
    cats = [n for n in inc.step.graph.nodes if is_op(n, aten.cat)]
    assert len(cats) >= 2 * layers
    # the running count (positions) continues from past_length: cumsum + past_length
    cumsum = [n for n in inc.step.graph.nodes if is_op(n, aten.cumsum)]
    assert cumsum and all(any(is_op(u, aten.add) for u in c.users) for c in cumsum)
    assert [s.shape for s in inc.state] == [()] + [(4, WINDOW, 8)] * 2 * layers  # heads, window, head dim
    assert inc.state_bytes() == 8 + 2 * layers * 4 * WINDOW * 8 * 4


def test_replay_matches_sliding_window_recompute():
    """Every step of a 100-step replay (past max_history, users of different lengths,
    one step of two events) equals the full recompute under the window within 1e-4."""
    inc = derived()
    worst, checked = 0.0, 0
    for t, scores, ids, mask in _replay(inc, 100):
        ref = band_reference(ids, mask, WINDOW)
        worst = max(worst, float((scores - ref).abs().max()))
        checked += 1
        if ids.shape[1] <= WINDOW:  # inside the window it is the unmodified model
            plain = optimized()(ids, mask)[0]
            assert float((scores - plain).abs().max()) <= 1e-4, t
    assert checked == 101 and ids.shape[1] == max(LENGTHS) + 101 > 10 * WINDOW
    assert worst <= 1e-4, worst


def test_batch_rows_equal_single_users():
    """A user's scores and state do not depend on who else is in the batch (or its padding)."""
    inc = derived()
    ids, mask = histories(LENGTHS)
    batch = inc.prefill(ids, mask)
    for b, n in enumerate(LENGTHS):
        alone = inc.prefill(ids[b:b + 1, -n:], mask[b:b + 1, -n:])
        for got, want in zip(batch, alone):
            assert torch.allclose(got[b:b + 1].float(), want.float(), atol=1e-5), b


def test_naive_reencode_differs_from_the_window():
    """With two layers, re-encoding only the last W events is not what the cache computes;
    record how far its top-10 is from the windowed scores (the README quotes the bench's figure)."""
    inc = derived()
    overlaps, diffs = [], []
    for t, scores, ids, mask in _replay(inc, 30):
        if ids.shape[1] > WINDOW + 1:
            naive = optimized()(*last_window(ids, mask, WINDOW))[0]
            diffs.append(float((scores - naive).abs().max()))
            overlaps.append(topk_overlap(scores[:, 1:], naive[:, 1:], k=10))
    assert max(diffs) > 1e-2  # it really differs (positions restart and layer >= 1 keys differ)
    assert 0.0 < sum(overlaps) / len(overlaps) < 1.0


@pytest.mark.parametrize("state_dtype,max_abs,overlap", [("bf16", 2e-2, 0.9), ("int8", 5e-2, 0.85)])
def test_state_dtype_fidelity(state_dtype, max_abs, overlap):
    """Low-precision state: max abs difference and top-10 overlap vs the fp32 state over a
    100-step replay (bounds measured with margin: bf16 ~3e-3/0.99, int8 ~1e-2/0.97)."""
    exact, low = derived(), derived(state_dtype)
    assert [s.dtype for s in low.state[1:]] == (
        [torch.bfloat16] * 4 if state_dtype == "bf16" else [torch.int8, torch.float32] * 4)
    assert low.state_bytes() < exact.state_bytes()
    worst, overlaps = 0.0, []
    for (_, a, _, _), (_, b, _, _) in zip(_replay(exact, 100), _replay(low, 100)):
        worst = max(worst, float((a - b).abs().max()))
        overlaps.append(topk_overlap(b[:, 1:], a[:, 1:], k=10))
    assert worst <= max_abs, worst
    assert sum(overlaps) / len(overlaps) >= overlap


def test_bidirectional_model_is_refused(program):
    """bert4rec reads keys after the query: not causal, refused before any rewrite."""
    bert = program("bert4rec:tiny")
    with pytest.raises(PreconditionError, match="not causal over real events: query 0 reads key 1"):
        analyze(bert)


def test_max_history_checked():
    with pytest.raises(PreconditionError, match="max_history must be an integer >= 2"):
        derive_incremental(optimized(), 1)
    with pytest.raises(PreconditionError, match="exceeds the position table \\(512 rows\\)"):
        derive_incremental(optimized(), 513)
    with pytest.raises(PreconditionError, match="state_dtype must be one of native, bf16, int8"):
        derive_incremental(optimized(), 8, "fp8")
