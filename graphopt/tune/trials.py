"""The trial log: ``OUT/trials.jsonl``, one JSON line per finished trial.

Each line is appended, flushed and fsynced as the trial finishes, so a
crash or SIGKILL loses at most the trial in flight. A torn last line (the
process died mid-write) is dropped when the log is read and cut off before
the next append. ``--resume`` reads the log and replays it: a candidate
whose key is already there is answered from its line, never re-run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.tune.space import Candidate

__all__ = ["Trial", "TrialLog", "TRIALS_FILE", "OK", "BELOW_BAR", "FAILED"]

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.jsonl"
OK, BELOW_BAR, FAILED = "ok", "below-bar", "failed"


@dataclass
class Trial:
    """One finished trial. ``status``: ok (built, timed, meets the bar), below-bar
    (screened out, or its runtime's outputs missed the bar), failed (one-line reason)."""

    n: int
    candidate: Candidate
    stage: str
    status: str
    pipeline: str = ""
    reason: str = ""
    fidelity: dict[str, Any] = field(default_factory=dict)
    runtime_fidelity: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    objective: float | None = None  # speedup over eager by the objective (higher is better)
    screen_s: float = 0.0
    compile_s: float = 0.0
    timing_s: float = 0.0
    wall_s: float = 0.0
    best: bool = False
    artifact: str = ""  # work folder of the lowered artifact while it is kept
    resumed: bool = False
    started: float = 0.0
    fingerprint: str = ""  # of the optimized program (same graph + weights = same artifact)
    twin_of: int | None = None  # results reused from this trial (same program, runtime, options)

    @property
    def key(self) -> str:
        return self.candidate.key

    @property
    def ok(self) -> bool:
        return self.status == OK and self.objective is not None and math.isfinite(self.objective)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n, "key": self.key, "stage": self.stage, "status": self.status, "reason": self.reason,
            "pipeline": self.pipeline, "runtime": self.candidate.runtime, "options": self.candidate.options,
            "candidate": self.candidate.to_json(), "fidelity": self.fidelity,
            "runtime_fidelity": self.runtime_fidelity, "latency": self.latency, "objective": self.objective,
            "screen_s": round(self.screen_s, 3), "compile_s": round(self.compile_s, 3),
            "timing_s": round(self.timing_s, 3), "wall_s": round(self.wall_s, 3), "best": self.best,
            "started": self.started, "fingerprint": self.fingerprint, "twin_of": self.twin_of,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Trial:
        return cls(
            n=int(d["n"]), candidate=Candidate.from_json(d["candidate"]), stage=d.get("stage", ""),
            status=d["status"], pipeline=d.get("pipeline", ""), reason=d.get("reason", ""),
            fidelity=d.get("fidelity") or {}, runtime_fidelity=d.get("runtime_fidelity") or {},
            latency=d.get("latency") or {}, objective=d.get("objective"), screen_s=d.get("screen_s", 0.0),
            compile_s=d.get("compile_s", 0.0), timing_s=d.get("timing_s", 0.0), wall_s=d.get("wall_s", 0.0),
            best=bool(d.get("best")), started=d.get("started", 0.0), resumed=True,
            fingerprint=d.get("fingerprint", ""), twin_of=d.get("twin_of"),
        )


class TrialLog:
    """Append-only ``trials.jsonl`` (flushed and fsynced per line)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._tail_checked = False

    def read(self) -> list[Trial]:
        """Every complete line; a torn or unreadable last line is skipped with a log note."""
        if not self.path.is_file():
            return []
        trials: list[Trial] = []
        lines = self.path.read_bytes().split(b"\n")
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                trials.append(Trial.from_json(json.loads(raw)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                where = "torn last line" if i >= len(lines) - 2 else f"line {i + 1}"
                log.warning("%s: skipping %s (%s)", self.path, where, e)
        return trials

    def _cut_torn_tail(self) -> None:
        """Drop bytes after the last newline (a line the previous process did not finish)."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, trial: Trial) -> None:
        if not self._tail_checked:
            self._cut_torn_tail()
            self._tail_checked = True
        line = json.dumps(trial.to_json(), default=_json_default, allow_nan=True) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)
