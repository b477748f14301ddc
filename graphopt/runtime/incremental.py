"""Incremental serving: a causal Program's ``prefill`` and ``step`` lowered into one artifact.

    art = graphopt.lower_incremental(program, "inductor", "out/inc", max_history=64)
    with graphopt.load("out/inc") as runner:
        scores, state = runner.prefill(input_ids, attention_mask)   # left-padded histories
        scores, state = runner.step(new_ids, state)                  # (batch, new) events, all real

The entry points come from :func:`graphopt.passlib.incremental.derive_incremental`
(what they compute: sliding-window attention of width ``max_history`` over
each user's whole history). The artifact folder holds each entry lowered by
the runtime's own lowerer in ``prefill/`` and ``step/``, and one
``manifest.json`` with checksums of both; its top-level inputs/outputs are
the prefill's, so ``runner(ids, mask)`` also runs prefill (scores, then the
state tensors). The ``incremental`` section records the window, the state
layout and each entry's contract.

``state`` is an :class:`IncrementalState`: ``length`` (events seen per
user) and each attention's keys/values of the last ``max_history`` events,
batch-major, so users can be stored apart and batched again
(:meth:`IncrementalState.select`, :meth:`IncrementalState.cat`) or pickled
(:mod:`graphopt.runtime.incremental_state`). ``step`` refuses a state of the
wrong names, dtypes, shape, window or batch, a step that would run past the
position table, and the padding id as a new event, with one line; it never
changes the state it is given. The padding id (``padding_id=``; a zoo model's
0 by default) is recorded in the ``incremental`` section; prefill refuses it
under ``attention_mask`` 1 too.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from graphopt.errors import LoweringError, RunnerError
from graphopt.ir.program import InputSpec, Program, bind_inputs, check_inputs
from graphopt.options import resolve_options
from graphopt.outputs import atomic_directory
from graphopt.process import quiet_backends
from graphopt.runtime.artifact import Artifact, write_manifest
from graphopt.runtime.backend import check_state, get_runtime, program_dtypes, require_available
from graphopt.runtime.contract import check_contract, dim_ranges
from graphopt.runtime.incremental_state import IncrementalState, tensor_versions
from graphopt.runtime.index_ranges import index_ranges
from graphopt.runtime.lower import file_checksums, lower_entry, manifest_head

if TYPE_CHECKING:
    from graphopt.passlib.incremental import IncrementalPrograms
    from graphopt.runtime.runner import Runner

__all__ = ["lower_incremental", "IncrementalState", "prefill", "step"]

log = logging.getLogger(__name__)

_ENTRIES = ("prefill", "step")
#: the id every zoo sequence model pads histories with (graphopt/rec/zoo: 0 = padding, 1.. = items)
ZOO_PADDING_ID = 0
_PATH_KEYS = ("entry", "optimized")


# ------------------------------------------------------------------ lowering
def _under(folder: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """An entry's ``backend`` section with its file paths (``_PATH_KEYS``, also in nested sections
    such as Inductor's ``split``) made relative to the artifact's top folder."""
    return {key: f"{folder}/{value}" if key in _PATH_KEYS and isinstance(value, str)
            else _under(folder, value) if isinstance(value, Mapping) else value for key, value in info.items()}


def _entry_manifest(program: Program, info: dict[str, Any], folder: str, options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "dir": folder,
        "options": dict(options),
        "inputs": [s.to_json() for s in program.inputs],
        "outputs": list(program.output_names),
        "dims": dim_ranges(program),
        "index_ranges": index_ranges(program),
        "backend": info,
    }


def lower_incremental(
    program: Program | IncrementalPrograms,
    runtime: str,
    out_dir: str | os.PathLike[str],
    *,
    max_history: int | None = None,
    state_dtype: str = "native",
    max_positions: int | None = None,
    force: bool = False,
    step_options: Mapping[str, Any] | None = None,
    padding_id: int | str | None = "auto",
    **options: Any,
) -> Artifact:
    """Derive ``prefill``/``step`` from a causal ``program`` (or take derived ones) and
    lower both with ``runtime`` into one artifact folder (atomic).

    ``max_history``: events each one attends to (the state's window);
    ``state_dtype``: ``native``, ``bf16`` or ``int8``; ``max_positions``: the
    positions served (see :func:`graphopt.passlib.incremental.derive_incremental`);
    ``options``: the runtime's lowering options, applied to both entries;
    ``step_options``: options that override them for the step entry alone (a step
    runs a few rows per user, where other kernels win). The runtime's own step
    defaults come first (``Backend.prefill_defaults`` / ``step_defaults``: Inductor does not
    autotune the prefill, and, off Intel's MKL, gives a base-size float32 prefill a plain-weights
    package for many rows per call (``split_rows``); it lowers a float32 step with
    ``weight_prepack=False``, MKL's GEMM on the plain weights, on an Intel CPU, and elsewhere, for a
    base-size model, with ``max_autotune=True``, its CPP GEMM template), then ``options``, then
    ``step_options`` (``options`` reach the step too: ``split_rows=N`` with
    ``step_options={"split_rows": 0}`` splits the prefill alone).
    ``padding_id``: the id that pads a history, refused as an event (a step's new event, an id under
    ``attention_mask`` 1); ``"auto"``: the zoo's 0 for a zoo model's Program, none otherwise; ``None``: none.
    """
    from graphopt.passlib.incremental import IncrementalPrograms, derive_incremental

    if isinstance(program, IncrementalPrograms):
        inc = program
    elif isinstance(program, Program):
        if max_history is None:
            raise LoweringError("lower_incremental needs max_history (the events each one attends to)")
        inc = derive_incremental(program, max_history, state_dtype, max_positions=max_positions)
    else:
        raise LoweringError(f"lower_incremental takes a Program, got {type(program).__name__}; capture the model first")
    pad = _padding_id(inc.prefill, padding_id)
    backend = get_runtime(runtime)
    runtime = backend.name
    require_available(backend)
    opts = backend.complete_options(inc.prefill, resolve_options(
        backend.lower_options, {**backend.prefill_defaults(inc.prefill, options), **options}, f"{runtime} | lower",
        LoweringError))
    asked = {**options, **(step_options or {})}
    step_opts = {**backend.step_defaults(inc.step, asked), **asked}
    entry_opts = {"prefill": opts, "step": backend.complete_options(
        inc.step, resolve_options(backend.lower_options, step_opts, f"{runtime} | lower step", LoweringError))}
    entries = {"prefill": inc.prefill, "step": inc.step}
    for name, entry in entries.items():
        try:
            backend.check_program(entry, entry_opts[name])
            check_state(backend, entry)
        except LoweringError:
            if inc.codec != "bf16" or torch.bfloat16 not in program_dtypes(entry):
                raise
            raise LoweringError(f"{runtime} | a bf16 state (state_dtype='bf16', --state-dtype bf16) computes in "
                                f"bfloat16, which {runtime} cannot run here; use int8 or native there, or the "
                                "inductor runtime") from None
    with atomic_directory(out_dir, force=force) as tmp, quiet_backends():
        infos: dict[str, dict[str, Any]] = {}
        for name, entry in entries.items():
            (tmp / name).mkdir()
            infos[name] = lower_entry(backend, entry, tmp / name, entry_opts[name])
        files = file_checksums(tmp)
        top = _under("prefill", infos["prefill"])
        prefill_program = entries["prefill"]
        manifest = {
            **manifest_head(prefill_program, backend, opts),
            "backend": top,
            "incremental": {**inc.to_json(), "padding_id": pad,
                            "entries": {n: _entry_manifest(entries[n], infos[n], n, entry_opts[n])
                                        for n in _ENTRIES}},
            "files": files,
        }
        manifest = write_manifest(tmp, manifest)
    log.info("lowered incremental %s with %s into %s (window %d, state %s)", prefill_program.name, runtime,
             out_dir, inc.window, inc.codec)
    return Artifact(Path(out_dir), manifest)


def _padding_id(program: Program, asked: int | str | None) -> int | None:
    """The id that pads histories: ``asked``, or for ``"auto"`` the zoo's (every zoo sequence model pads
    with 0, graphopt/rec/zoo) where the Program was captured from the zoo; a model of one's own: none
    (its padding id is not recorded in a Program: pass ``padding_id=``)."""
    if asked == "auto":
        return ZOO_PADDING_ID if program.meta.get("zoo") else None
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 0):
        raise LoweringError(f"padding_id must be an integer id >= 0, None or 'auto', got {asked!r}")
    return asked


# ------------------------------------------------------------------- running
def _section(runner: Runner) -> dict[str, Any]:
    section = runner.artifact.manifest.get("incremental") if runner.artifact is not None else None
    if not section:
        where = runner.artifact.path if runner.artifact is not None else "this runner"
        raise RunnerError(f"{runner.name} | {where} has no prefill/step entry points; lower the model with "
                          "graphopt.lower_incremental(program, runtime, dir, max_history=N)")
    return section


def _step_runner(runner: Runner, section: dict[str, Any]) -> Runner:
    """The step entry's runner (the same runtime and options), loaded on first use (once, whatever
    the number of serving threads asking)."""
    with runner._lock:
        subs = runner.__dict__.setdefault("_entry_runners", {})
        if "step" not in subs:
            entry = section["entries"]["step"]
            manifest = {k: v for k, v in runner.artifact.manifest.items() if k != "incremental"}
            manifest.update({k: entry[k] for k in ("inputs", "outputs", "dims", "index_ranges", "backend")})
            artifact = Artifact(runner.artifact.path / entry["dir"], manifest)
            sub = get_runtime(artifact.runtime).make_runner(artifact, runner.options)
            sub.check_contract = False  # step() checks the contract itself: the state needs less than the ids
            subs["step"] = sub
        sub = subs["step"]
    sub.ensure_active()
    return sub


def _state_error(runner: Runner, what: str) -> RunnerError:
    return RunnerError(f"{runner.name} | state{what}; pass the state this artifact's prefill or step returned")


@dataclass(frozen=True)
class _StepPlan:
    """What ``step`` checks a call against, parsed once per runner from its manifest."""

    ids: InputSpec
    specs: tuple[Any, ...]  # StateSpec, in the step's input order
    window: int
    rows: int | None  # max_positions
    state_dtype: str
    padding_id: int | None  # refused as an event (None: artifacts lowered before it was recorded, own models)

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @functools.cached_property
    def length_spec(self) -> tuple[Any, ...]:
        return tuple(s for s in self.specs if s.name == "length")

    @classmethod
    def of(cls, runner: Runner, section: dict[str, Any]) -> _StepPlan:
        plan = runner.__dict__.get("_step_plan")
        if plan is None:
            from graphopt.passlib.incremental import StateSpec

            plan = runner.__dict__["_step_plan"] = cls(
                InputSpec.from_json(section["entries"]["step"]["inputs"][0]),
                tuple(StateSpec.from_json(d) for d in section["state"]), int(section["max_history"]),
                section.get("max_positions"), section["state_dtype"], section.get("padding_id"))
        return plan


def _state_tensors(runner: Runner, plan: _StepPlan, state: Any, batch: int, new: int,
                   own: bool = False) -> list[torch.Tensor]:
    """The state's tensors in the step's input order, after checking each against the artifact
    (an ``own`` state, one this runner returned and nobody wrote since, has the artifact's names,
    dtypes and shapes and valid lengths: only its batch is checked against the new events')."""
    names = plan.names
    if isinstance(state, IncrementalState):
        tensors = state.tensors
    elif isinstance(state, Mapping):
        tensors = dict(state)
    else:
        raise _state_error(runner, f": expected an IncrementalState (or a dict of its tensors), got "
                                   f"{type(state).__name__}")
    if len(tensors) != len(names) or any(n not in tensors for n in names):
        missing = [n for n in names if n not in tensors]
        extra = [n for n in tensors if n not in names]
        which = f"lacks '{missing[0]}'" if missing else f"has an unknown tensor '{extra[0]}'"
        raise _state_error(runner, f" {which} (this artifact's state holds {', '.join(names)})")
    held = tensors["length"]
    if isinstance(held, torch.Tensor) and held.dim() == 1 and held.shape[0] != batch:
        raise RunnerError(f"{runner.name} | input '{plan.ids.name}': new events of {batch} users for a state of "
                          f"{held.shape[0]}; pass one row of new events per user of the state (state.select(users) "
                          "picks the users that have new events)")
    window = plan.window
    for spec in plan.length_spec if own else plan.specs:
        t = tensors[spec.name]
        if not isinstance(t, torch.Tensor):
            raise _state_error(runner, f" '{spec.name}': expected a tensor, got {type(t).__name__}")
        if t.dtype != spec.dtype:
            raise _state_error(runner, f" '{spec.name}': expected {str(spec.dtype).replace('torch.', '')}, "
                                       f"got {str(t.dtype).replace('torch.', '')} (state_dtype "
                                       f"{plan.state_dtype})")
        if t.shape[0] != batch or tuple(t.shape[1:]) != tuple(spec.shape):
            raise _state_error(runner, f" '{spec.name}': expected shape {[batch, *spec.shape]} (batch {batch}, "
                                       f"max_history {window}), got {list(t.shape)}")
    length = tensors["length"]
    if not own and length.numel() and int(length.min()) < 0:
        raise _state_error(runner, f" 'length': events seen must be >= 0, got {int(length.min())}")
    rows = plan.rows
    events = state.events if own else None
    if rows is not None and length.numel() and (int(length.max()) if events is None else events) + new > rows:
        user = int(length.argmax())
        raise RunnerError(
            f"{runner.name} | user {user} would reach position {int(length.max()) + new - 1}, past the {rows} "
            f"positions this artifact serves (max_positions); prefill that user again with its last {window} "
            "events (positions restart at 0)")
    return [tensors[n].contiguous() for n in names]


def _wrap(runner: Runner, section: dict[str, Any], outputs: Sequence[torch.Tensor],
          events: int | None) -> tuple[Any, IncrementalState]:
    n = len(section["scores"])
    plan = _StepPlan.of(runner, section)
    tensors = MappingProxyType(dict(zip(plan.names, outputs[n:])))
    state = IncrementalState(tensors, plan.window, origin=id(runner), events=events,
                             versions=tensor_versions(tensors))
    scores = outputs[0] if n == 1 else tuple(outputs[:n])
    return scores, state


def check_history(runner: Runner, bound: Sequence[torch.Tensor]) -> int:
    """Refuse histories an incremental state cannot hold (``bound``: the prefill's inputs, checked
    against the input specs); the most events any user has. ``prefill`` checks its inputs with it, and so
    should a plain call (``runner(ids, mask)``) of an incremental artifact."""
    section = _section(runner)
    names = runner.input_names
    ids, mask = bound[names.index("input_ids")], bound[names.index("attention_mask")]
    if not mask.numel():
        return 0
    bad = ((mask != 0) & (mask != 1)).any(1) | (mask[:, 1:] < mask[:, :-1]).any(1)
    if bool(bad.any()):
        raise RunnerError(f"{runner.name} | input 'attention_mask': histories must be left-padded (0s, then "
                          f"1s) for incremental state; user {int(bad.nonzero()[0])} is not")
    pad = section.get("padding_id")
    if pad is not None and ids.shape == mask.shape:
        padded = ((ids == pad) & (mask != 0)).any(1)
        if bool(padded.any()):
            raise RunnerError(f"{runner.name} | input 'input_ids': user {int(padded.nonzero()[0])} has the padding "
                              f"id {pad} under attention_mask 1; give padding attention_mask 0 (every id under 1 "
                              "is an event of the state)")
    events = int(mask.sum(1).max())
    rows = section.get("max_positions")
    if rows is not None and events > rows:
        raise RunnerError(f"{runner.name} | input 'attention_mask': a history of {events} events runs past the "
                          f"{rows} positions this artifact serves (max_positions); pass the last "
                          f"{section['max_history']} events")
    return events


def prefill(runner: Runner, *args: Any, **kwargs: Any) -> tuple[Any, IncrementalState]:
    """``runner.prefill(ids, attention_mask)``: scores and state of left-padded histories."""
    section = _section(runner)
    bound = bind_inputs(runner.inputs, args, kwargs, runner.name)
    check_inputs(runner.inputs, bound, runner.name)
    events = check_history(runner, bound)
    if runner.check_contract:
        check_contract(runner.inputs, bound, runner._dims, runner._index_ranges, runner.name)
    return _wrap(runner, section, runner.run_checked(bound), events)


def step(runner: Runner, input_ids: Any, state: Any) -> tuple[Any, IncrementalState]:
    """``runner.step(new_ids, state)``: scores after ``new_ids`` (batch, new) and the next state."""
    section = _section(runner)
    runner.ensure_active()
    plan = _StepPlan.of(runner, section)
    spec = plan.ids
    check_inputs([spec], [input_ids], runner.name)
    window = plan.window
    if not 1 <= input_ids.shape[1] <= window:
        raise RunnerError(f"{runner.name} | input '{spec.name}': a step takes 1 to max_history ({window}) new events "
                          f"per user, got {int(input_ids.shape[1])}; prefill longer histories")
    if plan.padding_id is not None:
        padded = (input_ids == plan.padding_id).any(1)
        if bool(padded.any()):
            raise RunnerError(f"{runner.name} | input '{spec.name}': user {int(padded.nonzero()[0])}'s new events "
                              f"hold the padding id {plan.padding_id}, and a step's events are all real; step only "
                              "the users with new events (state.select(users), IncrementalState.cat to batch "
                              "them again)")
    # a state this runner returned, none of its tensors written since (version counters), holds this
    # artifact's names, dtypes and shapes: only its batch is checked below, with no NaN scan of every
    # cached key/value per step (0.2 of 1.7 ms per step of gpt-rec:base at batch 1, AMX Xeon) and no
    # scan of its lengths; the new events' id ranges and dims are checked always, any other state in full
    own = isinstance(state, IncrementalState) and state.origin == id(runner) and state.untouched()
    tensors = _state_tensors(runner, plan, state, int(input_ids.shape[0]), int(input_ids.shape[1]), own)
    sub = _step_runner(runner, section)
    inputs = [input_ids, *tensors]
    if runner.check_contract:
        n = 1 if own else len(sub.inputs)
        check_contract(sub.inputs[:n], inputs[:n], sub._dims, sub._index_ranges, sub.name)
    events = state.events + int(input_ids.shape[1]) if own and state.events is not None else None
    return _wrap(runner, section, sub.run_checked(inputs), events)
