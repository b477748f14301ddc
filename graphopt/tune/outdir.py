"""``OUT`` of ``graphopt tune``: what ``--force`` may replace and what ``--resume`` may continue.

``--force`` starts over only in an earlier tune output (its marker's kind is
``tune`` and it holds ``tune.json``) or an empty folder, never in a fine-tuned
checkpoint, an ``optimize`` output or a user's folder, and never where OUT is,
holds or lies inside the model being tuned. Files a user put anywhere in OUT
(``best/`` and ``.work/`` included) are refused, so nothing of theirs is lost.
``--resume`` continues only a run with the same model (name and Program
fingerprint), data, calibration file (path and sha256), metric, bar, objective,
shapes, seed, threads and eager reference: trials measured under other settings
would otherwise be replayed as if they were this run's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from graphopt.errors import ArtifactError
from graphopt.outputs import MARKER, atomic_directory, check_output_path, check_replaceable, foreign_files
from graphopt.tune.data import DataSpecError
from graphopt.tune.keepbest import BEST_DIR
from graphopt.tune.sensitivity import SENSITIVITY_FILE
from graphopt.tune.trials import TRIALS_FILE, Trial, TrialLog

__all__ = ["TUNE_FILE", "RESULT_FILE", "WORK_DIR", "prepare_out", "check_force", "check_not_model", "RESUME_KEYS"]

TUNE_FILE = "tune.json"
RESULT_FILE = "result.json"
WORK_DIR = ".work"
TUNE_KIND = "tune"
#: top-level names a tune writes after tune.json (best/ and .work/ hold graphopt outputs with their own markers)
LATER = (TRIALS_FILE, RESULT_FILE, SENSITIVITY_FILE, BEST_DIR, WORK_DIR, "report.md", "pareto.png", "*.json.tmp",
         ".*.tmp-*")  # an interrupted exchange of best/ (graphopt.outputs.atomic_directory)
#: settings a resumed run must share with the run it continues, and how a message names each
RESUME_KEYS = {
    "model": "model", "model_name": "model", "program": "model (its Program's graph and weights, sha256)",
    "data": "--data", "calib": "--calib file", "calib_sha256": "--calib file contents (sha256)",
    "metric": "--metric", "max_drop": "--max-drop", "objective": "--objective",
    "shapes": "shapes (--batch-sizes/--seq-lens)", "runtimes": "--runtimes", "seed": "--seed", "threads": "--threads",
    "reference": "eager reference metrics",
}


def _marker_kind(out: Path) -> str | None:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker.get("kind") if isinstance(marker, dict) else None


def _what(out: Path) -> str:
    kind = _marker_kind(out)
    for name, what in (("graphopt-checkpoint.json", "a fine-tuned checkpoint"), ("manifest.json", "an artifact"),
                       ("program.pt2", "a saved Program (an `optimize` output)"), ("demo.json", "a demo report"),
                       ("report.json", "a bench report")):
        if (out / name).is_file():
            return what
    return f"a graphopt '{kind}' output" if kind else "a graphopt output"


def check_force(out: Path) -> None:
    """Refuse ``--force`` over anything but an earlier tune output or an empty folder."""
    check_replaceable(out, force=True)  # a user's folder, or a user's files added to ours: refused
    if not any(out.iterdir()):
        return
    if _marker_kind(out) != TUNE_KIND or not (out / TUNE_FILE).is_file():
        raise ArtifactError(f"{out} is {_what(out)}, not a `graphopt tune` output; --force replaces only an "
                            "earlier tune output: pick another -o")


def check_not_model(out: Path, model: Any) -> None:
    """Refuse an OUT that is, holds or lies inside the model being tuned (a path MODEL)."""
    if not isinstance(model, (str, os.PathLike)):
        return
    path = Path(model).expanduser()
    if not path.exists():
        return
    m, o = path.resolve(), out.resolve()
    if m == o or m.is_relative_to(o) or (m.is_dir() and o.is_relative_to(m)):
        where = "is" if m == o else "holds" if m.is_relative_to(o) else "lies inside"
        raise ArtifactError(f"-o {out} {where} the model being tuned ({model}); pick an -o outside it")


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12]  # a sha256
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


def check_resume_settings(out: Path, before: dict[str, Any], settings: dict[str, Any]) -> None:
    """One line naming the first setting that differs from the run OUT continues."""
    for key, what in RESUME_KEYS.items():
        if key not in before:
            raise DataSpecError(f"--resume: {out / TUNE_FILE} does not record the {what} (an older graphopt "
                                "wrote it), so its trials cannot be checked against this run; start over with --force")
        if not _same(before[key], settings.get(key)):
            raise DataSpecError(f"--resume: {out} was tuned with another {what} ({_show(before[key])}; this run: "
                                f"{_show(settings.get(key))}); resume with the same settings or start over with --force")


def _check_replaced_parts(out: Path) -> None:
    """A resumed run replaces best/ and removes .work/: refuse a user's files in them up front."""
    foreign = [f for f in foreign_files(out) if f.split("/", 1)[0] in (BEST_DIR, WORK_DIR) and "/" in f]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ArtifactError(f"--resume: {out} holds files graphopt did not write ({foreign[0]}{more}); the run "
                            f"replaces {BEST_DIR}/ and removes {WORK_DIR}/: move them out of {out} and run again")


def prepare_out(out: Path, settings: dict[str, Any], resume: bool, force: bool) -> list[Trial]:
    """Create OUT (or check it for --resume); return the trials to replay."""
    out = check_output_path(out)
    if out.exists() and resume:
        if not (out / TUNE_FILE).is_file():
            raise ArtifactError(f"{out} has no {TUNE_FILE}: it is not a graphopt tune output; drop --resume or pick another -o")
        check_resume_settings(out, json.loads((out / TUNE_FILE).read_text()), settings)
        _check_replaced_parts(out)
        for stale in out.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return TrialLog(out / TRIALS_FILE).read()
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --resume to continue it or --force to start over")
    if out.exists():
        check_force(out)
    with atomic_directory(out, force=force, kind=TUNE_KIND, later=LATER) as tmp:
        (tmp / TUNE_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    return []
