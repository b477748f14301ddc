"""Incremental user state for causal models: ``prefill`` and ``step`` derived from one Program.

    inc = derive_incremental(program, max_history=64)       # IncrementalPrograms
    scores, length, *kv = inc.prefill(ids, mask)            # history -> scores + state
    scores, length, *kv = inc.step(new_ids, length, *kv)    # one new event -> scores + state

What it computes, exactly: the model with **sliding-window attention** of
width ``max_history`` over each user's whole history (every event attends to
itself and the ``max_history - 1`` events before it; positions as the model
defines them, counted from the user's first event). With one layer that
equals re-encoding the last ``max_history`` events; with more it does not:
a cached key of layer >= 1 was computed when its event still read events that
have since left the window, which is what a full recompute under the
window does too (Mistral's sliding-window cache has the same semantics).
Up to ``max_history`` events it is the unmodified model.

Steps are checked against that definition when derived (``check=True``):
prefill equals the original Program while the history fits the window, and
prefill + steps equal a prefill of the whole history, on a probe batch with
left padding and a window that slides.
"""

from __future__ import annotations

import logging

import torch

from graphopt.errors import PreconditionError
from graphopt.ir.program import Program
from graphopt.passlib.incremental.analysis import CausalPlan, analyze, probe_inputs
from graphopt.passlib.incremental.derive import (
    IncrementalPrograms,
    StateSpec,
    rewrite_prefill,
    rewrite_step,
    state_names,
    state_specs,
)
from graphopt.passlib.incremental.kernels import CODECS

__all__ = ["derive_incremental", "IncrementalPrograms", "StateSpec", "CausalPlan", "analyze", "CODECS",
           "state_names", "check_tolerance"]

log = logging.getLogger(__name__)


def check_tolerance(dtype: torch.dtype, codec: str) -> float:
    """Relative tolerance (times ``max(1, |scores|)``) the self-check holds steps to:
    1e-4 for float32 compute with native state, looser for low-precision compute or state."""
    if codec != "native":
        return 0.1  # lossy state: catches a wrong structure, not rounding (fidelity is measured, see tests)
    return 1e-4 if dtype == torch.float32 else 3e-2


def derive_incremental(program: Program, max_history: int, state_dtype: str = "native", *,
                       max_positions: int | None = None, check: bool = True) -> IncrementalPrograms:
    """Derive the ``prefill``/``step`` Programs of a causal ``(ids, attention_mask)`` Program.

    ``max_history``: the window W (events each one attends to, itself included);
    the state holds each attention's keys and values of the last W events.
    ``state_dtype``: ``native`` (the graph's dtype), ``bf16`` or ``int8``
    (per event and head, float32 scale). ``max_positions``: serve positions
    ``0..max_positions-1`` only (default: the whole position table); a model
    fine-tuned on windows of N events has trained position rows for 0..N-1
    only, so ``max_positions=N`` makes the runner refuse a step past them
    (prefill the user's last events again instead). Raises ``PreconditionError`` with the
    reason when the Program is not causal, has no SDPA, or the steps do not
    reproduce the windowed full recompute.
    """
    if not isinstance(max_history, int) or isinstance(max_history, bool) or max_history < 2:
        raise PreconditionError(f"max_history must be an integer >= 2, got {max_history!r}")
    if state_dtype not in CODECS:
        raise PreconditionError(f"state_dtype must be one of {', '.join(CODECS)}, got {state_dtype!r}")
    plan = analyze(program)
    if plan.max_positions is not None and max_history > plan.max_positions:
        raise PreconditionError(
            f"incremental state for {program.name}: max_history {max_history} exceeds the position table "
            f"({plan.max_positions} rows); choose max_history <= {plan.max_positions}")
    if max_positions is not None:
        table = plan.max_positions
        if plan.max_positions is None:
            raise PreconditionError(f"incremental state for {program.name}: max_positions given, but no position "
                                    "table is indexed by the running event count; leave it unset")
        if not isinstance(max_positions, int) or not max_history <= max_positions <= table:
            raise PreconditionError(f"max_positions must be an integer in [max_history, {table}] (the position "
                                    f"table), got {max_positions!r}")
        plan.max_positions = max_positions
    seq = 7 if max_history == 6 else 6
    example = _by_name(program, probe_inputs(program, [seq, seq - 2], seq, seed=1))
    prefill = rewrite_prefill(program, plan, max_history, state_dtype, example)
    n_scores = len(program.output_names)
    state = tuple(t.contiguous() for t in prefill(*example)[n_scores:])
    new = probe_inputs(program, [2, 2], 2, seed=2)[0]
    step = rewrite_step(program, plan, max_history, state_dtype, (new, *state))
    inc = IncrementalPrograms(prefill, step, max_history, state_dtype, list(program.output_names),
                              state_specs(plan, max_history, state_dtype), plan.max_positions)
    if check:
        _self_check(program, plan, inc)
    log.info("derived prefill/step of %s: %d attentions, window %d, state %s, %d bytes per user",
             program.name, len(plan.attentions), max_history, state_dtype, inc.state_bytes())
    return inc


def _by_name(program: Program, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    ids, mask = pair
    return tuple(mask if n == "attention_mask" else ids for n in program.input_names)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> float | None:
    """None when ``|got - want| <= rel * max(1, |want|)``, else the max abs difference."""
    diff = float((got.float() - want.float()).abs().max())
    bound = rel * max(1.0, float(want.float().abs().max()))
    return None if diff <= bound else diff


def _self_check(program: Program, plan: CausalPlan, inc: IncrementalPrograms) -> None:
    """Prefill == the original while the history fits; prefill + steps == prefill of everything."""
    rel = check_tolerance(plan.attentions[0].dtype, inc.codec)
    w = inc.window
    fits = min(w, 8)
    probe = _by_name(program, probe_inputs(program, [fits, max(1, fits - 3)], fits, seed=3))
    want = program(*probe)[0]
    diff = _close(inc.prefill(*probe)[0], want, check_tolerance(plan.attentions[0].dtype, "native"))
    if diff is not None and want.dim() >= 3 and want.shape[1] == probe[0].shape[1]:
        raise PreconditionError(f"incremental state for {program.name}: its output covers every position "
                                f"({list(want.shape)} for {probe[0].shape[1]} events); incremental serving scores "
                                "the newest event: return the last position (logits[:, -1]) and capture again")
    if diff is not None:
        raise PreconditionError(f"incremental state for {program.name}: prefill differs from the model by {diff:.3g} "
                                "on a history within the window; the model is not one the derivation handles")
    history = w + 2
    if plan.max_positions is not None:
        history = min(history, plan.max_positions - 4)
    ids, mask = probe_inputs(program, [history, history - 3], history, seed=4)
    new = probe_inputs(program, [4, 4], 4, seed=5)[0]
    n = len(inc.scores)
    state = inc.prefill(*_by_name(program, (ids, mask)))[n:]
    for start, stop in ((0, 1), (1, 2), (2, 4)):
        out = inc.step(new[:, start:stop], *state)
        state = out[n:]
        seen = (torch.cat([ids, new[:, :stop]], 1), torch.cat([mask, torch.ones_like(mask[:, :stop])], 1))
        diff = _close(out[0], inc.prefill(*_by_name(program, seen))[0], rel)
        if diff is not None:
            raise PreconditionError(
                f"incremental state for {program.name}: a step differs from the full recompute by {diff:.3g} "
                f"(new events {start}..{stop - 1} after {history}, window {w}); the model mixes events outside "
                "attention (e.g. dynamic per-tensor quantization) and cannot be served incrementally")
