"""``graphopt reproduce DIR``: re-run the pass failure ``optimize --reproducer DIR`` saved.

Runs the failing step on the saved input Program with the saved example
inputs, calibration batches, RNG state and verify-each setting. The failure
reproduced: exit 1 with the pass's one-line error (as any failing optimize);
it did not: exit 0 and a line saying so (with the versions it was saved under).
``--import MODULE`` (repeatable) imports the module that registers your own
passes first; a pipeline with them says which modules to import.
"""

from __future__ import annotations

import argparse

import torch

from graphopt.transform.reproducer import rerun


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="re-run the pass failure saved by `optimize --reproducer DIR`")
    p.add_argument("dir", help="the folder `graphopt optimize --reproducer DIR` wrote")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: it registers your own passes (repeatable; the failure names them)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _, meta = rerun(args.dir, args.imports)  # a reproduced failure raises PassFailedError: exit 1, one line
    saved = meta.get("versions", {})
    print(f"did not reproduce: {meta.get('failing_pass')} ran without failing on {args.dir}/input.pt2 "
          f"(saved under graphopt {saved.get('graphopt')}, torch {saved.get('torch')}; "
          f"now torch {torch.__version__})")
    return 0
