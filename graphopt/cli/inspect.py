"""``graphopt inspect MODEL``: op histogram, parameters, inputs and dynamic dims;
with ``--memory``, the memory analysis (weights by kind and dtype, activation
peak per batch/seq, the tensors live at the peak; ``--plot FILE``)."""

from __future__ import annotations

import argparse
import json

from graphopt.cli.argtypes import positive_ints
from graphopt.rec.resolve import load_program


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="op histogram, parameter count and dynamic dims of a model")
    p.add_argument("model", help="zoo name (bert4rec:tiny), saved Program (.pt2 or folder) or HF folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--graph", action="store_true", help="also print the graph")
    p.add_argument("--memory", action="store_true",
                   help="predict memory: weights by kind/dtype, activation peak per shape (eager run)")
    p.add_argument("--batch-sizes", type=positive_ints("--batch-sizes"), metavar="B,B",
                   help="batch sizes to evaluate (implies --memory; default: the example's)")
    p.add_argument("--seq-lens", type=positive_ints("--seq-lens"), metavar="S,S",
                   help="sequence lengths, models with a dynamic 'seq' dim (implies --memory)")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of predicted peak memory vs batch size (implies --memory)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.memory or args.batch_sizes or args.seq_lens or args.plot:  # each implies --memory
        from graphopt.cli.inspect_memory import check_plot, run_memory

        check_plot(args)  # before the model loads: a refused output costs nothing
        return run_memory(load_program(args.model), args)
    program = load_program(args.model)
    info = program.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model       {info['name']}")
    print(f"parameters  {info['parameters']:,} ({info['parameter_bytes'] / 2**20:.2f} MiB)")
    print(f"nodes       {info['nodes']}")
    if info["pipeline"]:
        print(f"pipeline    {info['pipeline']}")
    print("inputs")
    for spec in program.inputs:
        dims = [spec.dynamic.get(i, str(s)) for i, s in enumerate(spec.shape)]
        print(f"  {spec.name:<16} {str(spec.dtype).replace('torch.', ''):<8} [{', '.join(dims)}]")
    print(f"outputs     {', '.join(info['outputs'])}")
    print("ops")
    for op, count in sorted(info["ops"].items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:5d}  {op}")
    if args.graph:
        print(program.graph)
    return 0
