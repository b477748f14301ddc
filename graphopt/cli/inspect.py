"""``graphopt inspect MODEL``: op histogram, parameters, inputs and dynamic dims."""

from __future__ import annotations

import argparse
import json

from graphopt.rec.resolve import load_program


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="op histogram, parameter count and dynamic dims of a model")
    p.add_argument("model", help="zoo name (bert4rec:tiny), saved Program (.pt2 or folder) or HF folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--graph", action="store_true", help="also print the graph")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
