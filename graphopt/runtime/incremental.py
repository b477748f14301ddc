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
(:meth:`IncrementalState.select`, :meth:`IncrementalState.cat`). ``step``
refuses a state of the wrong names, dtypes, shape, window or batch, and a
step that would run past the position table, with one line; it never
changes the state it is given.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from graphopt.errors import LoweringError, RunnerError
from graphopt.ir.program import InputSpec, Program, bind_inputs, check_inputs
from graphopt.options import resolve_options
from graphopt.outputs import atomic_directory
from graphopt.process import quiet_backends
from graphopt.runtime.artifact import MANIFEST_FILE, Artifact
from graphopt.runtime.backend import get_runtime, program_dtypes, require_available
from graphopt.runtime.contract import check_contract, dim_ranges, index_ranges
from graphopt.runtime.lower import file_checksums, lower_entry, manifest_head

if TYPE_CHECKING:
    from graphopt.passlib.incremental import IncrementalPrograms
    from graphopt.runtime.runner import Runner

__all__ = ["lower_incremental", "IncrementalState", "prefill", "step"]

log = logging.getLogger(__name__)

_ENTRIES = ("prefill", "step")
_PATH_KEYS = ("entry", "optimized")


@dataclass(frozen=True)
class IncrementalState:
    """The state ``prefill``/``step`` return: named tensors, batch-major."""

    tensors: Mapping[str, torch.Tensor]
    max_history: int
    #: the runner that returned it (its own output, read-only, is not checked tensor by tensor again)
    origin: int | None = field(default=None, compare=False, repr=False)
    #: the most events any user has seen, when the runner that returned it knows (saves a reduction per step)
    events: int | None = field(default=None, compare=False, repr=False)

    @property
    def length(self) -> torch.Tensor:
        """Events seen per user ``(batch,)``: the position of each user's next event."""
        return self.tensors["length"]

    @property
    def batch_size(self) -> int:
        return int(self.length.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def select(self, index: Any) -> IncrementalState:
        """The state of some users (``index`` as in ``tensor[index]``, kept 1-d)."""
        return IncrementalState({k: t[index].reshape(-1, *t.shape[1:]) for k, t in self.tensors.items()},
                                self.max_history)

    @classmethod
    def cat(cls, states: Sequence[IncrementalState]) -> IncrementalState:
        """Users of several states in one batch (same artifact)."""
        first = states[0]
        return cls({k: torch.cat([s.tensors[k] for s in states]) for k in first.tensors}, first.max_history)


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
            "incremental": {**inc.to_json(),
                            "entries": {n: _entry_manifest(entries[n], infos[n], n, entry_opts[n])
                                        for n in _ENTRIES}},
            "files": files,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    log.info("lowered incremental %s with %s into %s (window %d, state %s)", prefill_program.name, runtime,
             out_dir, inc.window, inc.codec)
    return Artifact(Path(out_dir), manifest)


# ------------------------------------------------------------------- running
def _section(runner: Runner) -> dict[str, Any]:
    section = runner.artifact.manifest.get("incremental") if runner.artifact is not None else None
    if not section:
        where = runner.artifact.path if runner.artifact is not None else "this runner"
        raise RunnerError(f"{runner.name} | {where} has no prefill/step entry points; lower the model with "
                          "graphopt.lower_incremental(program, runtime, dir, max_history=N)")
    return section


def _step_runner(runner: Runner, section: dict[str, Any]) -> Runner:
    """The step entry's runner (the same runtime and options), loaded on first use."""
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
    if not sub.is_active:
        sub.activate()
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
                section.get("max_positions"), section["state_dtype"])
        return plan


def _state_tensors(runner: Runner, plan: _StepPlan, state: Any, batch: int, new: int,
                   own: bool = False) -> list[torch.Tensor]:
    """The state's tensors in the step's input order, after checking each against the artifact
    (an ``own`` state, one this runner returned and read-only, has the artifact's names, dtypes
    and shapes and valid lengths: only its batch is checked against the new events')."""
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
    state = IncrementalState(MappingProxyType(dict(zip(plan.names, outputs[n:]))), plan.window, origin=id(runner),
                             events=events)
    scores = outputs[0] if n == 1 else tuple(outputs[:n])
    return scores, state


def prefill(runner: Runner, *args: Any, **kwargs: Any) -> tuple[Any, IncrementalState]:
    """``runner.prefill(ids, attention_mask)``: scores and state of left-padded histories."""
    section = _section(runner)
    bound = bind_inputs(runner.inputs, args, kwargs, runner.name)
    check_inputs(runner.inputs, bound, runner.name)
    mask = bound[runner.input_names.index("attention_mask")]
    if mask.numel():
        if bool(((mask != 0) & (mask != 1)).any()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            user = int((((mask != 0) & (mask != 1)).any(1) | (mask[:, 1:] < mask[:, :-1]).any(1)).nonzero()[0])
            raise RunnerError(f"{runner.name} | input 'attention_mask': histories must be left-padded (0s, then "
                              f"1s) for incremental state; user {user} is not")
    events = int(mask.sum(1).max()) if mask.numel() else 0
    rows = section.get("max_positions")
    if rows is not None and events > rows:
        raise RunnerError(f"{runner.name} | input 'attention_mask': a history of {events} events runs past the "
                          f"{rows} positions this artifact serves (max_positions); pass the last "
                          f"{section['max_history']} events")
    return _wrap(runner, section, runner(*bound), events)


def step(runner: Runner, input_ids: Any, state: Any) -> tuple[Any, IncrementalState]:
    """``runner.step(new_ids, state)``: scores after ``new_ids`` (batch, new) and the next state."""
    section = _section(runner)
    if not runner.is_active:
        runner.activate()
    plan = _StepPlan.of(runner, section)
    spec = plan.ids
    check_inputs([spec], [input_ids], runner.name)
    window = plan.window
    if not 1 <= input_ids.shape[1] <= window:
        raise RunnerError(f"{runner.name} | input '{spec.name}': a step takes 1 to max_history ({window}) new events "
                          f"per user, got {int(input_ids.shape[1])}; prefill longer histories")
    # a state this runner returned is read-only and holds this artifact's names, dtypes and shapes:
    # only its batch is checked below, with no NaN scan of every cached key/value per step (0.2 of
    # 1.7 ms per step of gpt-rec:base at batch 1, AMX Xeon) and no scan of its lengths; the new
    # events' id ranges and dims are checked always, a foreign state in full
    own = isinstance(state, IncrementalState) and state.origin == id(runner)
    tensors = _state_tensors(runner, plan, state, int(input_ids.shape[0]), int(input_ids.shape[1]), own)
    sub = _step_runner(runner, section)
    inputs = [input_ids, *tensors]
    if runner.check_contract:
        n = 1 if own else len(sub.inputs)
        check_contract(sub.inputs[:n], inputs[:n], sub._dims, sub._index_ranges, sub.name)
    events = state.events + int(input_ids.shape[1]) if own and state.events is not None else None
    return _wrap(runner, section, sub.run_checked(inputs), events)
