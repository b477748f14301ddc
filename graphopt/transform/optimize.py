"""``graphopt.optimize``: capture if needed, run a pipeline, report."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from graphopt.errors import GraphoptError, PostconditionError, RunnerError, first_line
from graphopt.ir.capture import capture
from graphopt.ir.fx import drop_unused_attrs
from graphopt.ir.program import Program, check_inputs, positional
from graphopt.metrics import drift
from graphopt.transform.base import Pass
from graphopt.transform.instruments import Instrument
from graphopt.transform.manager import PassContext, PassManager
from graphopt.transform.pipeline import Pipeline, parse_pipeline
from graphopt.transform.report import OptimizeReport
from graphopt.transform.state import preserved_state

__all__ = ["optimize"]


def optimize(
    program_or_model: Program | torch.nn.Module,
    pipeline: str | Pipeline | Sequence[Pass],
    example_inputs: Any = None,
    calibration_data: Iterable[Any] | None = None,
    *,
    validation: Callable[[Callable[..., Any]], Mapping[str, float]] | None = None,
    verify_each: bool | None = None,
    print_after_change: bool = False,
    instruments: Iterable[Instrument] = (),
    reproducer_dir: str | None = None,
    seed: int = 0,
) -> tuple[Program, OptimizeReport]:
    """Run ``pipeline`` on a Program (or capture an nn.Module first).

    The input Program is not modified: passes run on a copy. Returns the
    optimized Program and an :class:`OptimizeReport` with per-pass records
    and the numeric drift of the result against the input on the example
    inputs. ``validation``: the user's quality metrics on held-out data as a
    function of a model callable (``fn(*inputs) -> outputs``) -> ``{"hr@10": ...,
    "ndcg@10": ...}`` (e.g. ``graphopt.bench.make_evaluator(EvalData(...))``):
    ``quantize-int8``'s accuracy guard then also holds the fidelity bar on it
    (each metric within 0.5% relative of the float model's). Use validation
    data, not the test data the result is reported on.

    A model that updates a buffer as it runs (a step counter) is run here with
    the buffer put back afterwards: the result starts in the state the input had.
    """
    pipeline = parse_pipeline(pipeline)  # every parse/option error before any work
    if isinstance(program_or_model, Program):
        program = program_or_model.copy()
    elif isinstance(program_or_model, torch.nn.Module):
        if example_inputs is None:
            raise GraphoptError("optimize(model, ...) needs example_inputs to capture the model")
        program = capture(program_or_model, example_inputs)
    else:
        raise GraphoptError(
            f"optimize takes a Program or an nn.Module, got {type(program_or_model).__name__}"
        )
    if example_inputs is not None and isinstance(program_or_model, Program):
        inputs = positional(example_inputs, program.input_names, "example_inputs")
    else:
        inputs = program.sample_inputs()
    with preserved_state(program):  # a stateful model's buffers stay as they were
        reference = _copied(program(*inputs))  # copied first: an output may alias a restored buffer
    report = OptimizeReport(
        model=program.name,
        pipeline=str(pipeline),
        params_before=program.num_parameters(),
        nodes_before=len(program.graph.nodes),
    )
    ctx = PassContext(
        example_inputs=inputs,
        calibration_data=_calibration_batches(program, calibration_data) if calibration_data is not None else None,
        validation=validation,
        seed=seed,
    )
    pm = PassManager(
        pipeline,
        instruments=instruments,
        verify_each=verify_each,
        print_after_change=print_after_change,
        reproducer_dir=reproducer_dir,
    )
    start = time.perf_counter()
    torch.manual_seed(seed)
    program, report.passes = pm.run(program, ctx)
    report.total_time_s = time.perf_counter() - start
    drop_unused_attrs(program.gm)
    program.gm.recompile()
    steps = [s for s in (program.pipeline, str(pipeline)) if s]
    program.pipeline = ",".join(steps)
    report.params_after = program.num_parameters()
    report.nodes_after = len(program.graph.nodes)
    # a pass may change float input dtypes (cast{io=native}): feed the Program its own dtypes
    inputs = tuple(
        x.to(spec.dtype) if x.is_floating_point() and spec.dtype.is_floating_point else x
        for x, spec in zip(inputs, program.inputs)
    )
    try:
        with preserved_state(program):
            outputs = _copied(program(*inputs))
    except Exception as e:  # a pass broke the graph and verify-each was off: one line, not a traceback
        raise PostconditionError(
            f"pipeline '{pipeline}' produced a Program that fails to run: {first_line(e, with_type=True)}; "
            "run again with verify_each=True (--verify-each) to name the pass"
        ) from e
    report.drift = drift(outputs, reference)
    return program, report



def _calibration_batches(program: Program, calibration_data: Iterable[Any]) -> list[tuple[torch.Tensor, ...]]:
    """The batches as positional tuples, each checked against the Program's inputs as the runners check
    theirs (count, dtype, rank, static dims) and for NaN/inf, which observers would turn into an inf
    scale (an all-NaN Program) or a histogram crash, or skip unseen (min/max ignore NaN): one line naming
    ``calibration_data[i]`` and the input, before any pass runs."""
    out = []
    for i, b in enumerate(calibration_data):
        where = f"calibration_data[{i}]"
        batch = positional(b, program.input_names, where)
        try:
            check_inputs(program.inputs, batch, where)
        except RunnerError as e:
            raise RunnerError(str(e).replace(f"{where} | ", f"{where}: ", 1)) from None
        for spec, x in zip(program.inputs, batch):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                counts = {"NaN": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum())}
                what = " and ".join(f"{v} {k}" for k, v in counts.items() if v)
                raise RunnerError(f"{where}: input '{spec.name}' holds {what} value(s); replace "
                                  "missing values (torch.nan_to_num, or the feature's default) or drop the batch")
        out.append(batch)
    return out


def _copied(outputs: Any) -> list[Any]:
    return [o.detach().clone() if isinstance(o, torch.Tensor) else o for o in outputs]
