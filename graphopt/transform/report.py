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
        """Plain-text fusion-coverage report.

        A summary table (one row per pass: time, changed, rewrites, declines,
        node delta), then a section per pass that did or declined something:
        rewrites per rule, op histogram delta, parameter change, declines
        grouped by reason (with where each happened), and notes.
        """
        lines = [f"model {self.model}", f"pipeline {self.pipeline or '(empty)'}", ""]
        width = min(max([len(p.name) for p in self.passes] + [4]), 40)
        lines.append(f" #  {'pass':<{width}}  {'time':>9}  changed  {'rewrites':>8}  {'declined':>8}  {'ops':>5}")
        for i, p in enumerate(self.passes, 1):
            name = p.name if len(p.name) <= width else p.name[: width - 3] + "..."
            ops = sum(p.ops_after.values()) - sum(p.ops_before.values())
            lines.append(
                f"{i:>2}  {name:<{width}}  {p.time_s * 1000:7.1f}ms  {'yes' if p.modified else 'no':<7}  "
                f"{sum(p.stats.values()):>8}  {len(p.declined):>8}  {ops:>+5}"
            )
        for i, p in enumerate(self.passes, 1):
            if not (p.modified or p.declined or p.notes):
                continue
            lines.append("")
            lines.append(f"[{i}] {p.step}")
            found = sum(p.stats.values()) + len(p.declined)
            if p.declined:
                lines.append(f"    matches: {found} found, {sum(p.stats.values())} rewritten, {len(p.declined)} declined")
            if p.stats:
                lines.append("    rewrites: " + ", ".join(f"{k}: {v}" for k, v in p.stats.items()))
            delta = ", ".join(
                f"{k.replace('aten.', '').replace('.default', '')} {v:+d}" for k, v in p.ops_delta().items()
            )
            if delta:
                lines.append(f"    ops delta: {delta}")
            if p.params_after != p.params_before:
                lines.append(f"    params {p.params_before:,} -> {p.params_after:,}")
            for reason, places in _group_declines(p.declined):
                shown = ", ".join(places[:4]) + (f", +{len(places) - 4} more" if len(places) > 4 else "")
                count = f" (x{len(places)})" if len(places) > 1 else ""
                lines.append(f"    declined{count}: {reason}" + (f"  [{shown}]" if shown else ""))
            for n in p.notes:
                lines.append(f"    note: {n}")
        lines.append("")
        lines.append(
            f"parameters {self.params_before:,} -> {self.params_after:,}; "
            f"nodes {self.nodes_before} -> {self.nodes_after}; total {self.total_time_s:.2f}s"
        )
        if self.drift:
            lines.append("drift vs input program: " + ", ".join(f"{k} {v:.3g}" for k, v in self.drift.items()))
        return "\n".join(lines)


def _group_declines(declined: list[str]) -> list[tuple[str, list[str]]]:
    """``"where: why"`` lines grouped by ``why``, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for line in declined:
        place, sep, reason = line.partition(": ")
        if not sep:
            place, reason = "", line
        groups.setdefault(reason, [])
        if place:
            groups[reason].append(place)
    return list(groups.items())
