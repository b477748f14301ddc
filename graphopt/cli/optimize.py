"""``graphopt optimize MODEL -p PIPELINE -o OUT``: run a pipeline, save the Program."""

from __future__ import annotations

import argparse
import json

from graphopt.cli.argtypes import non_negative_int, positive_int
from graphopt.errors import ArtifactError, LoweringError, PassOptionError, PipelineParseError
from graphopt.options import resolve_options
from graphopt.outputs import atomic_directory, check_replaceable
from graphopt.passlib.calibration import DEFAULT_CALIBRATION_BATCHES
from graphopt.rec.resolve import load_program_and_inputs
from graphopt.transform.optimize import optimize
from graphopt.transform.pipeline import parse_pipeline
from graphopt.transform.reproducer import import_modules


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optimize", help="run a pass pipeline and save the optimized Program")
    p.add_argument("model", help="zoo name (bert4rec:tiny), saved Program (.pt2 or folder) or HF folder")
    p.add_argument("-p", "--pipeline", required=True, help="pipeline text, e.g. 'O1,fuse-qkv' (see `graphopt passes`)")
    p.add_argument("-o", "--output", required=True, help="output folder (program.pt2 + report.json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("--report", action="store_true", help="print the per-pass report")
    p.add_argument("--verify-each", action="store_true", help="lint, run and compare after every pass")
    p.add_argument("--print-after-change", action="store_true", help="print the graph after each change")
    p.add_argument("--calibration-batches", type=positive_int, default=DEFAULT_CALIBRATION_BATCHES,
                   help="calibration batches for passes that need them: a zoo model's or checkpoint's own inputs, "
                        "else random ones (the int8 guard holds out a quarter)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: it registers your own passes (repeatable)")
    p.add_argument("--reproducer", metavar="DIR", help="on a pass failure, save its input Program and pipeline here")
    p.add_argument("--runtime", action="append", default=[], metavar="NAME",
                   help="also lower the result into OUT/NAME/ (repeatable; see `graphopt runtimes`)")
    p.add_argument("--runtime-option", action="append", default=[], metavar="KEY=VALUE",
                   help="lowering option for --runtime, e.g. fusions=false (see `graphopt runtimes --options`)")
    inc = p.add_argument_group("incremental serving (causal models: prefill/step entries, see the README)")
    inc.add_argument("--max-history", type=int, metavar="N",
                     help="lower each --runtime with graphopt.lower_incremental: state of the last N events")
    inc.add_argument("--state-dtype", choices=("native", "bf16", "int8"), default="native",
                     help="how the state stores keys/values (default: the graph's dtype)")
    inc.add_argument("--max-positions", type=positive_int, metavar="N", help="positions served (the model's training length)")
    inc.add_argument("--padding-id", type=non_negative_int, metavar="ID",
                     help="the id that pads histories, refused as an event (default: 0 for a zoo model, none otherwise)")
    inc.add_argument("--step-option", action="append", default=[], metavar="KEY=VALUE",
                     help="lowering option for the step entry alone, e.g. weight_prepack=true")
    p.set_defaults(run=run)


def _calibration(program, n: int, needed: bool, make_inputs=None):  # type: ignore[no-untyped-def]
    """``n`` batches: a zoo model's or checkpoint's own inputs where it has them, as ``graphopt bench``
    calibrates (the same seeds, 1000+), else random draws from the Program's input specs. The draws
    are full-length histories (every mask 1), the zoo's have a length each, left-padded, as users'
    do: bert4rec:base's int8 guard, AMD EPYC, kept 10 of 18 linears int8 on the draws and 16 of 18
    on the zoo's histories (Inductor, batch 32, one interleaved run: 1.36x and 1.87x eager, top-10
    overlap 0.997 and 0.992)."""
    if not needed or n <= 0:
        return None
    from graphopt.passlib.calibration import CALIBRATION_SEED, DEFAULT_CALIBRATION_BATCH, default_calibration

    if make_inputs is not None:
        return [make_inputs(DEFAULT_CALIBRATION_BATCH, None, CALIBRATION_SEED + i) for i in range(n)]
    return default_calibration(program, n)


def _runtime_options(pairs: list[str], flag: str = "--runtime-option") -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PipelineParseError(f"{flag} {pair!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


def _check_runtimes(names: list[str], given: dict[str, str]) -> list[str]:
    """The --runtime names, current and each once; an unknown or unavailable runtime, or an option one
    does not have, is a usage error before the model loads (was: found after the pipeline ran)."""
    from graphopt.runtime import canonical_runtime, get_runtime

    checked: list[str] = []
    for name in names:
        try:
            backend = get_runtime(canonical_runtime(name))  # OUT/<current name>
        except LoweringError as e:
            raise PipelineParseError(f"--runtime: {e}") from None
        if backend.name in checked:  # `--runtime onnxruntime --runtime onnxruntime`: lowered once
            continue
        reason = backend.unavailable_reason()
        if reason:
            raise PipelineParseError(f"--runtime {backend.name}: not available here: {reason}")
        resolve_options(backend.lower_options, given, f"--runtime-option ({backend.name})", PassOptionError)
        checked.append(backend.name)
    return checked


def _check_reproducer(folder: str) -> None:
    """A --reproducer folder the failure could not be saved to is refused before the pipeline runs."""
    from graphopt.transform.reproducer import check_reproducer_dir

    try:
        check_reproducer_dir(folder)
    except ArtifactError as e:
        text = str(e).replace("pick another -o", "pick another --reproducer folder").replace(
            "pick a new folder with -o", "pick a new folder for --reproducer")
        raise ArtifactError(text if text.startswith("--reproducer") else f"--reproducer {folder}: {text}") from None


def _lower_all(program, args: argparse.Namespace, tmp) -> list[str]:  # type: ignore[no-untyped-def]
    """Lower into OUT/<runtime>/ for each --runtime (inside the atomic OUT); with
    --max-history, prefill and step of the causal Program (derived once)."""
    from graphopt.runtime import lower, lower_incremental

    options = _runtime_options(args.runtime_option)
    if args.max_history is None:
        for name in args.runtime:
            lower(program, name, tmp / name, **options)
        return list(args.runtime)
    from graphopt.passlib.incremental import derive_incremental

    inc = derive_incremental(program, args.max_history, args.state_dtype, max_positions=args.max_positions)
    step_options = _runtime_options(args.step_option, "--step-option")
    for name in args.runtime:
        lower_incremental(inc, name, tmp / name, step_options=step_options,
                          padding_id="auto" if args.padding_id is None else args.padding_id, **options)
    return list(args.runtime)


def run(args: argparse.Namespace) -> int:
    import_modules(args.imports)  # they register passes the pipeline names
    pipeline = parse_pipeline(args.pipeline)  # usage errors before loading anything
    if args.runtime:
        args.runtime = _check_runtimes(args.runtime, _runtime_options(args.runtime_option))
    elif args.runtime_option:
        raise PipelineParseError("--runtime-option sets a lowering option: name the runtime(s) with --runtime")
    incremental = [flag for flag, value in (("--state-dtype", args.state_dtype != "native"),
                                            ("--max-positions", args.max_positions is not None),
                                            ("--padding-id", args.padding_id is not None),
                                            ("--step-option", args.step_option)) if value]
    if args.max_history is not None or incremental:
        if args.max_history is None:
            raise PipelineParseError(f"{incremental[0]} needs --max-history N (incremental lowering)")
        if not args.runtime:
            raise PipelineParseError("--max-history lowers prefill/step entries: name the runtime(s) with --runtime")
        if args.max_history < 2:
            raise PipelineParseError(f"--max-history must be >= 2 (the events each one attends to, itself "
                                     f"included), got {args.max_history}")
        _runtime_options(args.step_option, "--step-option")
    check_replaceable(args.output, force=args.force)  # a refused -o fails before the model loads
    if args.reproducer:
        _check_reproducer(args.reproducer)  # found now, not after the pipeline failed
    program, make_inputs = load_program_and_inputs(args.model)
    needs_data = any("calibration_data" in p.requires for p in pipeline)
    with atomic_directory(args.output, force=args.force) as tmp:
        optimized, report = optimize(
            program,
            pipeline,
            calibration_data=_calibration(program, args.calibration_batches, needs_data, make_inputs),
            verify_each=args.verify_each or None,
            print_after_change=args.print_after_change,
            reproducer_dir=args.reproducer,
        )
        optimized.save(tmp / "program.pt2")
        report.save(str(tmp / "report.json"))
        (tmp / "report.txt").write_text(report.render() + "\n")
        artifacts = _lower_all(optimized, args, tmp)
    if args.report:
        print(report.render())
    summary = {
        "output": args.output,
        "pipeline": str(pipeline),
        "parameters": [report.params_before, report.params_after],
        "nodes": [report.nodes_before, report.nodes_after],
        "max_abs_drift": report.drift.get("max_abs"),
    }
    if artifacts and args.max_history is not None:
        summary["incremental"] = {"max_history": args.max_history, "state_dtype": args.state_dtype}
    if artifacts:
        summary["artifacts"] = {name: f"{args.output.rstrip('/')}/{name}" for name in artifacts}
    print(json.dumps(summary))
    return 0
