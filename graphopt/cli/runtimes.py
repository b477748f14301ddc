"""``graphopt runtimes``: each runtime, whether it works here, and why not."""

from __future__ import annotations

import argparse
import json

from graphopt.runtime import available_runtimes, get_runtime


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runtimes", help="list backend runtimes, their availability and options")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--options", action="store_true", help="also list lowering and runner options")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    statuses = available_runtimes()
    if args.json:
        print(json.dumps([s.to_json() for s in statuses.values()], indent=2))
        return 0
    for s in statuses.values():
        state = "available" if s.available else "unavailable"
        version = s.versions.get("backend", "")
        detail = f"{version}  {s.summary}" if s.available else s.reason
        print(f"{s.name:<12} {state:<12} {detail}")
        if args.options:
            backend = get_runtime(s.name)
            for kind, opts in (("lower", backend.lower_options), ("load", backend.runner_options)):
                for o in opts:
                    print(f"    {kind}: {o.name}={o.default!r}  {o.help}")
    return 0
