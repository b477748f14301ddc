"""``graphopt passes``: every pass with its options, contract and summary."""

from __future__ import annotations

import argparse
import json

from graphopt.transform.base import available_passes, available_presets


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("passes", help="list passes, their options and presets")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def describe() -> dict:
    out = {}
    for name, cls in available_passes().items():
        out[name] = {
            "summary": cls.summary(),
            "options": [
                {"name": o.name, "type": o.type_name(), "default": o.format(o.default), "help": o.help}
                for o in cls.options
            ],
            "requires": sorted(cls.requires),
            "preserves": sorted(cls.preserves),
            "numerics": "exact" if cls.exact else f"approximate (tolerance {cls.tolerance:g})",
            "notes": cls.backend_notes,
        }
    return out


def run(args: argparse.Namespace) -> int:
    passes = describe()
    presets = available_presets()
    if args.json:
        print(json.dumps({"passes": passes, "presets": {k: v[0] for k, v in presets.items()}}, indent=2))
        return 0
    for name, info in passes.items():
        print(f"{name}  —  {info['summary']}")
        contract = f"numerics: {info['numerics']}"
        if info["requires"]:
            contract += f"; requires: {', '.join(info['requires'])}"
        if info["preserves"]:
            contract += f"; preserves: {', '.join(info['preserves'])}"
        print(f"    {contract}")
        for o in info["options"]:
            print(f"    {o['name']}={o['default']:<12} {o['type']}. {o['help']}")
        if info["notes"]:
            print(f"    note: {info['notes']}")
    print("\npresets:")
    for name, (text, summary) in presets.items():
        print(f"  {name}  —  {summary}\n      {text}")
    print("\npipeline syntax: pass{option=value option=value},pass,...  e.g. remove-dropout,dce")
    return 0
