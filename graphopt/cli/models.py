"""``graphopt models``: the built-in model zoo."""

from __future__ import annotations

import argparse

from graphopt.rec.zoo import available_models


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the zoo models (name:size)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for name in available_models():
        print(name)
    return 0
