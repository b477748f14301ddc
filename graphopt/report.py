"""OptimizeReport: what each pass did, how long it took, and the drift it caused."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PassRecord", "OptimizeReport"]

REPORT_FORMAT = "graphopt.optimize-report/1"


@dataclass
class PassRecord:
    """One pass run: timing, op histogram delta, parameters, rule counts."""

    name: str
    step: str
    time_s: float = 0.0
    modified: bool = False
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    declined: list[str] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verify_error: float | None = None

    def ops_delta(self) -> dict[str, int]:
        keys = set(self.ops_before) | set(self.ops_after)
        delta = {k: self.ops_after.get(k, 0) - self.ops_before.get(k, 0) for k in keys}
        return {k: v for k, v in sorted(delta.items()) if v}


@dataclass
class OptimizeReport:
    model: str
    pipeline: str
    passes: list[PassRecord] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    drift: dict[str, float] = field(default_factory=dict)
    total_time_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = REPORT_FORMAT
        for rec, obj in zip(d["passes"], self.passes):
            rec["ops_delta"] = obj.ops_delta()
        return d

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2, default=str)

    def render(self) -> str:
        """Plain-text report: per pass what matched, what changed, what declined."""
        lines = [f"model {self.model}", f"pipeline {self.pipeline or '(empty)'}"]
        width = max([len(p.step) for p in self.passes] + [4])
        width = min(width, 60)
        lines.append(f"{'pass':<{width}}  {'time':>8}  changed  ops delta / rule counts")
        for p in self.passes:
            delta = ", ".join(f"{k.replace('aten.', '').replace('.default', '')} {v:+d}" for k, v in p.ops_delta().items())
            stats = ", ".join(f"{k}: {v}" for k, v in p.stats.items())
            changed = "yes" if p.modified else "no"
            step = p.step if len(p.step) <= width else p.step[: width - 3] + "..."
            lines.append(f"{step:<{width}}  {p.time_s * 1000:7.1f}ms  {changed:<7}  {delta or '-'}")
            if stats:
                lines.append(f"{'':<{width}}  {'':>8}  {'':<7}  {stats}")
            if p.params_after != p.params_before:
                lines.append(
                    f"{'':<{width}}  {'':>8}  {'':<7}  params {p.params_before:,} -> {p.params_after:,}"
                )
            for d in p.declined:
                lines.append(f"{'':<{width}}  {'':>8}  {'':<7}  declined: {d}")
            for n in p.notes:
                lines.append(f"{'':<{width}}  {'':>8}  {'':<7}  note: {n}")
        lines.append(
            f"parameters {self.params_before:,} -> {self.params_after:,}; "
            f"nodes {self.nodes_before} -> {self.nodes_after}; total {self.total_time_s:.2f}s"
        )
        if self.drift:
            lines.append("drift vs input program: " + ", ".join(f"{k} {v:.3g}" for k, v in self.drift.items()))
        return "\n".join(lines)
