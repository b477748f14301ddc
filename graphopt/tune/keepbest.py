"""Keep-best: ``OUT/best/`` always holds the best artifact found so far.

The candidate's lowered artifact is copied into a temp sibling, its
``manifest.json`` gains a ``tune`` section (pipeline, runtime, options,
fidelity, latency, objective, trial number), and the folder replaces
``OUT/best`` through :func:`graphopt.outputs.atomic_directory` (one atomic
exchange on Linux), so ``graphopt.load(OUT/best)`` works at every moment,
including after Ctrl-C or SIGKILL. The artifact's own files keep their
checksums; the manifest is not among the checksummed files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from graphopt.outputs import atomic_directory
from graphopt.runtime.artifact import MANIFEST_FILE, read_artifact, write_manifest
from graphopt.tune.trials import Trial

__all__ = ["BEST_DIR", "write_best", "tune_section"]

BEST_DIR = "best"


def tune_section(trial: Trial, *, metric: str, bar: str, objective: str) -> dict[str, Any]:
    """What the manifest says about how this artifact was chosen."""
    c = trial.candidate
    return {
        "trial": trial.n,
        "pipeline": trial.pipeline,
        "runtime": c.runtime,
        "options": c.options,
        "fidelity": trial.runtime_fidelity or trial.fidelity,
        "fidelity_eager": trial.fidelity,
        "metric": metric,
        "bar": bar,
        "latency": trial.latency,
        "objective": objective,
        "speedup": trial.objective,
        "key": trial.key,
    }


def write_best(out_dir: Path, artifact: Path, section: dict[str, Any]) -> Path:
    """Replace ``out_dir/best`` with a copy of ``artifact`` whose manifest carries ``section``."""
    read_artifact(artifact, verify=False)  # refuse to promote something that is not an artifact
    target = Path(out_dir) / BEST_DIR
    with atomic_directory(target, force=True, kind="tune-best") as tmp:
        shutil.copytree(artifact, tmp, dirs_exist_ok=True)
        manifest = json.loads((tmp / MANIFEST_FILE).read_text())
        manifest["tune"] = section
        write_manifest(tmp, manifest)
    return target
