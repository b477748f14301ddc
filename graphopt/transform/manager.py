"""Runs a Pipeline on a Program, enforcing each pass's contract.

Before a pass: its ``requires`` are met (shape metadata propagated, data
present). After it: the graph lints and is recompiled, analyses it does not
preserve are dropped, and a pass that claims to preserve ``shapes`` really
left ``meta["val"]`` on every node. A pass that raises is reported by name
with the passes that ran before it, and can leave a reproducer on disk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import GraphoptError, PassFailedError, PostconditionError, PreconditionError, first_line
from graphopt.ir.program import positional
from graphopt.transform.analysis import AnalysisManager
from graphopt.transform.base import Pass, PassResult, is_builtin
from graphopt.transform.instruments import (
    Instrument,
    OpHistogramInstrument,
    PrintAfterChangeInstrument,
    TimingInstrument,
    VerifyEachInstrument,
)
from graphopt.transform.pipeline import Pipeline, parse_pipeline
from graphopt.transform.report import PassRecord

__all__ = ["PassContext", "PassManager", "verify_each_default"]

log = logging.getLogger(__name__)


def verify_each_default() -> bool:
    """``GRAPHOPT_VERIFY_EACH=1`` turns verify-each on everywhere (tests do)."""
    return os.environ.get("GRAPHOPT_VERIFY_EACH", "") not in ("", "0", "false")


@dataclass
class PassContext:
    """What passes may read besides the Program: data and cached analyses."""

    example_inputs: tuple[torch.Tensor, ...] | None = None
    calibration_data: Sequence[Any] | None = None
    #: the user's validation metrics as a function of a model callable (``fn(*inputs) -> outputs``)
    #: -> ``{"hr@10": ..., "ndcg@10": ...}``; passes that trade accuracy hold the fidelity bar on it
    validation: Callable[[Callable[..., Any]], Mapping[str, float]] | None = None
    seed: int = 0
    analyses: AnalysisManager = field(default_factory=AnalysisManager)
    passes_run: list[str] = field(default_factory=list)

    def verify_inputs(self, program: Any) -> tuple[torch.Tensor, ...]:
        return self.example_inputs if self.example_inputs is not None else program.sample_inputs()

    def calibration_batches(self) -> list[tuple[torch.Tensor, ...]]:
        """Calibration data as a list of positional input tuples."""
        if not self.calibration_data:
            return []
        return [positional(b, None, "calibration_data") for b in self.calibration_data]  # optimize() bound them


def _has_shape_meta(program: Any) -> bool:
    return all(
        "val" in n.meta
        for n in program.gm.graph.nodes
        if n.op in ("call_function", "get_attr", "placeholder") and n.users
    )


class PassManager:
    """``PassManager("remove-dropout,dce").run(program)`` -> list of PassRecord."""

    def __init__(
        self,
        pipeline: str | Pipeline | Sequence[Pass],
        *,
        instruments: Iterable[Instrument] = (),
        verify_each: bool | None = None,
        print_after_change: bool = False,
        reproducer_dir: str | os.PathLike[str] | None = None,
    ):
        self.pipeline = parse_pipeline(pipeline)
        verify = verify_each_default() if verify_each is None else verify_each
        self.verify_each = verify
        inst: list[Instrument] = [OpHistogramInstrument()]
        if verify:
            inst.append(VerifyEachInstrument())
        if print_after_change:
            inst.append(PrintAfterChangeInstrument())
        inst.extend(instruments)
        inst.append(TimingInstrument())  # last: before-hooks run in order, after-hooks reversed
        self.instruments = inst
        self.reproducer_dir = Path(reproducer_dir) if reproducer_dir else None

    def _check_requires(self, p: Pass, program: Any, ctx: PassContext) -> None:
        for req in sorted(p.requires):
            if req == "shapes":
                ctx.analyses.get("shapes", program)
            elif req == "calibration_data":
                if not ctx.calibration_data:
                    raise PreconditionError(
                        f"pass '{p.name}' needs calibration data; pass calibration_data=[...] "
                        "to graphopt.optimize (or --calibration-batches on the CLI)"
                    )
            elif req == "example_inputs":
                if ctx.example_inputs is None and program.example_inputs is None:
                    raise PreconditionError(f"pass '{p.name}' needs example inputs")
            else:
                ctx.analyses.get(req, program)

    def _check_result(self, p: Pass, result: Any, shapes_were_valid: bool) -> None:
        if not isinstance(result, PassResult):
            raise PostconditionError(f"pass '{p.name}' returned {type(result).__name__}, not PassResult")
        gm = result.program.gm
        if result.modified:
            try:
                gm.graph.lint()
            except Exception as e:
                raise PostconditionError(f"pass '{p.name}' left an invalid graph: {e}") from e
            gm.recompile()
            if "shapes" in p.preserves and shapes_were_valid:
                missing = [
                    n.name
                    for n in gm.graph.nodes
                    if n.op in ("call_function", "get_attr", "placeholder") and n.users and "val" not in n.meta
                ]
                if missing:
                    raise PostconditionError(
                        f"pass '{p.name}' declares it preserves shapes but left nodes without "
                        f"meta['val']: {', '.join(missing[:5])}"
                    )

    def run(self, program: Any, ctx: PassContext | None = None) -> tuple[Any, list[PassRecord]]:
        """Run every pass in order on ``program`` (mutated in place)."""
        ctx = ctx or PassContext(example_inputs=program.example_inputs)
        if _has_shape_meta(program):
            ctx.analyses.mark_valid("shapes")  # a captured Program arrives with fresh meta["val"]
        records: list[PassRecord] = []
        start = (program.copy(), torch.get_rng_state()) if self.reproducer_dir else None
        for p in self.pipeline:
            record = PassRecord(name=p.name, step=p.step_text())
            snapshot = program.copy() if self.reproducer_dir else None
            rng_state = torch.get_rng_state() if self.reproducer_dir else None
            try:
                self._check_requires(p, program, ctx)
                for inst in self.instruments:
                    inst.before_pass(p, program, ctx, record)
                shapes_were_valid = ctx.analyses.is_valid("shapes")
                result = p.run(program, ctx)
                self._check_result(p, result, shapes_were_valid)
                program = result.program
                if result.modified:
                    ctx.analyses.invalidate(p.preserves)
                for inst in reversed(self.instruments):
                    inst.after_pass(p, program, result, ctx, record)
            except Exception as e:
                for inst in self.instruments:
                    inst.after_failure(p, program, e, ctx)
                where = self._save_reproducer(start, (snapshot, rng_state), p, ctx, e)
                before = ", ".join(ctx.passes_run) or "none"
                detail = first_line(e, with_type=False) if str(e).strip() else ""
                detail = detail.removeprefix(f"pass '{p.name}' ")
                kind = "" if isinstance(e, GraphoptError) else f"{type(e).__name__}: "
                raise PassFailedError(
                    f"pass '{p.name}' failed (passes before it: {before}): {kind}{detail}{where}"
                ) from e
            record.modified = result.modified
            record.stats = dict(result.stats)
            record.declined = list(result.declined)
            record.details = list(result.details)
            record.notes = list(result.notes)
            ctx.passes_run.append(p.name)
            records.append(record)
            log.debug("pass %s: modified=%s stats=%s", p.name, result.modified, result.stats)
        return program, records

    def _save_reproducer(self, start: Any, before: Any, p: Pass, ctx: PassContext, exc: BaseException) -> str:
        if start is None or self.reproducer_dir is None:
            return ""
        from graphopt.transform.reproducer import rerun_command, save_reproducer

        modules = {q.name: type(q).__module__ for q in self.pipeline if not is_builtin(type(q))}
        try:
            d = save_reproducer(self.reproducer_dir, start, before, p.step_text(), str(self.pipeline), ctx,
                                self.verify_each, exc, modules)
        except Exception as save_error:  # a reproducer must never hide the real failure
            log.warning("could not save reproducer: %s", save_error)
            return f" (no reproducer: {first_line(save_error)})"
        return f" (reproducer in {d}; re-run: {rerun_command(d, modules)})"
