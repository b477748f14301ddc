"""``graphopt check-tensorrt TARGET``: static TensorRT-compatibility check.

TARGET is an ``.onnx`` file, an artifact folder holding ``model.onnx``, or a
model (zoo name, saved Program), which is exported to ONNX first (as the
``tensorrt`` runtime exports it). Exits 1 when an error-level problem is
found; an int8 form TensorRT rejects (asymmetric or uint8 Q/DQ, or
quantize-int8-dynamic's DynamicQuantizeLinear) also prints the fix.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from graphopt.errors import ArtifactError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-tensorrt", help="check an ONNX graph or a model for TensorRT 10/11 compatibility")
    p.add_argument("target", help=".onnx file, artifact folder with model.onnx, zoo name or saved Program")
    p.add_argument("--json", action="store_true", help="machine-readable findings")
    p.add_argument("--all", action="store_true", help="also show info-level findings")
    p.set_defaults(run=run)


def _onnx_path(target: str, tmpdir: str) -> Path:
    path = Path(target)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if path.is_dir() and (path / "model.onnx").is_file():
        return path / "model.onnx"
    if path.is_dir() and not (path / "program.pt2").is_file():
        raise ArtifactError(f"{path} holds no model.onnx or program.pt2; point at an .onnx file or a model")
    from graphopt.process import quiet_backends
    from graphopt.rec.resolve import load_program
    from graphopt.runtimes.onnx_export import export_onnx, save_onnx

    program = load_program(target)
    with quiet_backends():
        model = export_onnx(program, for_tensorrt=True)  # what the tensorrt runtime would parse
    out = Path(tmpdir) / "model.onnx"
    save_onnx(model, out, program.parameter_bytes())
    return out


def run(args: argparse.Namespace) -> int:
    from graphopt.runtimes.tensorrt import int8_fix
    from graphopt.runtimes.tensorrt_check import TRT_VERSION, check_onnx

    with tempfile.TemporaryDirectory() as tmp:
        findings = check_onnx(_onnx_path(args.target, tmp))
    errors = [f for f in findings if f.severity == "error"]
    fix = int8_fix(errors)
    shown = findings if args.all else [f for f in findings if f.severity != "info"]
    if args.json:
        print(json.dumps({"target": args.target, "tensorrt": TRT_VERSION, "errors": len(errors),
                          "fix": fix[1] if fix else None, "findings": [f.to_json() for f in shown]}, indent=2))
    else:
        for f in shown:
            print(f)
        verdict = "not TensorRT-compatible" if errors else "TensorRT-compatible"
        print(f"{args.target}: {verdict} ({len(errors)} errors, {len(findings) - len(errors)} other findings; "
              f"checked against TensorRT {TRT_VERSION})")
        if fix:
            print(f"fix: {fix[1]}")
    return 1 if errors else 0
